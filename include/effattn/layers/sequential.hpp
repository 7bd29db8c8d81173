#pragma once
// Sequential<Blocks...>: different layers in order, each seeded apart.

#include <concepts>
#include <cstddef>
#include <tuple>
#include <utility>

#include "effattn/core/types.hpp"
#include "effattn/layers/detail/composition.hpp"
#include "effattn/layers/detail/decoding.hpp"
#include "effattn/layers/detail/stack_ops.hpp"
#include "effattn/layers/layer.hpp"

namespace effattn {

/// Sequential<A, B, …>: different layers in order, block i built from the i-th config with
/// its seed salted by i. Parameters are named "block.<i>.<name>" (layers/parameter_paths.hpp).
template <class... Blocks>
class Sequential
    : public detail::StackOps<Sequential<Blocks...>,
                              typename std::tuple_element_t<0, std::tuple<Blocks...>>::Scalar> {
  static_assert(sizeof...(Blocks) > 0, "effattn: Sequential<> needs at least one layer");
  static_assert((detail::assert_layer<Blocks>() && ...),
                "Sequential<Blocks...>: every block must be a layer");
  using S = typename std::tuple_element_t<0, std::tuple<Blocks...>>::Scalar;
  static_assert((std::same_as<typename Blocks::Scalar, S> && ...),
                "effattn: Sequential<Blocks...> needs blocks of one Scalar type.");
  using Base = detail::StackOps<Sequential<Blocks...>, S>;
  friend Base;

 public:
  static constexpr const char* name = "Sequential";
  static constexpr bool reversible = (ReversibleLayer<Blocks> && ...);
  static constexpr bool position_wise = (Blocks::position_wise && ...);

  /// The blocks' configs, in order. Made from them directly, so that a Sequential inside
  /// another layer's config is written as its blocks' configs: Repeat<Sequential<A, B>>
  /// takes {.block = {a_config, b_config}, .depth = 4}.
  struct Config {
    std::tuple<typename Blocks::Config...> blocks{};
    Config() = default;
    Config(typename Blocks::Config... configs) : blocks(std::move(configs)...) {}
    Config(std::tuple<typename Blocks::Config...> all) : blocks(std::move(all)) {}
    Config reseeded(std::uint64_t salt) const {
      return Config(std::apply(
          [&](const auto&... c) { return std::tuple{detail::reseed(c, salt)...}; }, blocks));
    }
  };

  explicit Sequential(Config config)
      : blocks_(build(config, std::index_sequence_for<Blocks...>{})) {
    this->check_widths();
  }
  explicit Sequential(typename Blocks::Config... configs) : Sequential(Config(configs...)) {}

  static constexpr Index count() { return sizeof...(Blocks); }

  /// Incremental decoding (causal models): one decoder per block; decode(x, y, decoder) runs
  /// the next tokens through every block (StackOps::decode).
  using Decoder = std::tuple<detail::DecoderOf<Blocks>...>;
  Decoder start_decoding(Index batch) const {
    return std::apply(
        [&](const auto&... b) { return Decoder{detail::start_decoding(b, batch)...}; }, blocks_);
  }
  template <std::size_t I>
  auto& get() {
    return std::get<I>(blocks_);
  }

 private:
  template <std::size_t... I>
  static std::tuple<Blocks...> build(const Config& c, std::index_sequence<I...>) {
    return std::tuple<Blocks...>{Blocks(detail::reseed(std::get<I>(c.blocks), I))...};
  }
  template <class Self, class F>
  static void visit_in(Self& self, Index i, F& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      ((i == Index(I) ? (f(std::get<I>(self.blocks_)), 0) : 0), ...);
    }
    (std::index_sequence_for<Blocks...>{});
  }
  template <class F>
  void visit(Index i, F&& f) {
    visit_in(*this, i, f);
  }
  template <class Self, class D, class F>
  static void visit_decoding_in(Self& self, Index i, D& d, F& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      ((i == Index(I) ? (f(std::get<I>(self.blocks_), std::get<I>(d)), 0) : 0), ...);
    }
    (std::index_sequence_for<Blocks...>{});
  }
  template <class F>
  void visit_decoding(Index i, Decoder& d, F&& f) {
    visit_decoding_in(*this, i, d, f);
  }
  template <class F>
  void visit_decoding(Index i, const Decoder& d, F&& f) const {
    visit_decoding_in(*this, i, d, f);
  }
  template <class F>
  void visit(Index i, F&& f) const {
    visit_in(*this, i, f);
  }

  std::tuple<Blocks...> blocks_;
};

}  // namespace effattn

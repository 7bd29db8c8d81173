#pragma once
// Repeat<Block, N>: N blocks of one type (or a depth chosen at run time), each seeded apart.

#include <cstdint>
#include <deque>
#include <utility>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/composition.hpp"
#include "effattn/layers/detail/decoding.hpp"
#include "effattn/layers/detail/stack_ops.hpp"
#include "effattn/layers/layer.hpp"

namespace effattn {

/// Repeat<Block, N>: N blocks of one type, each built from the block config with its own
/// seeds (block i's config reseeded with salt i). Repeat<Block> (N = runtime_depth) takes
/// the depth from the config at run time. Parameters are named "block.<i>.<name>"
/// (layers/parameter_paths.hpp).
inline constexpr Index runtime_depth = 0;

template <class Block, Index Depth = runtime_depth>
class Repeat : public detail::StackOps<Repeat<Block, Depth>, typename Block::Scalar> {
  static_assert(detail::assert_layer<Block>(), "Repeat<Block, N>: Block must be a layer");
  static_assert(Depth >= 0, "effattn: Repeat<Block, N> needs N ≥ 1 (or runtime_depth)");
  using Base = detail::StackOps<Repeat<Block, Depth>, typename Block::Scalar>;
  friend Base;

 public:
  static constexpr const char* name = "Repeat";
  static constexpr bool reversible = ReversibleLayer<Block>;
  static constexpr bool position_wise = Block::position_wise;

  struct Config {
    typename Block::Config block{};
    Index depth = Depth;
    Config reseeded(std::uint64_t salt) const { return {detail::reseed(block, salt), depth}; }
  };

  explicit Repeat(Config config) {
    if constexpr (Depth != runtime_depth)
      detail::require(config.depth == Depth, name, "depth", config.depth,
                      detail::concat("the type's depth, ", Depth));
    detail::require(config.depth >= 1, name, "depth", config.depth, "at least 1 block");
    for (Index i = 0; i < config.depth; ++i)
      blocks_.emplace_back(detail::reseed(config.block, static_cast<std::uint64_t>(i)));
    this->check_widths();
  }
  /// The same, written without the config's names: Repeat<Sequential<A, B>> stack({a, b}, 12)
  /// is 12 blocks of A then B (a Sequential's config is its blocks' configs in order).
  Repeat(typename Block::Config block, Index depth) : Repeat(Config{std::move(block), depth}) {}

  Index count() const { return static_cast<Index>(blocks_.size()); }
  Index depth() const { return count(); }
  Block& operator[](Index i) { return blocks_[static_cast<std::size_t>(i)]; }

  /// Incremental decoding (causal models): one decoder per block; decode(x, y, decoder) runs
  /// the next tokens through every block (StackOps::decode).
  using Decoder = std::vector<detail::DecoderOf<Block>>;
  Decoder start_decoding(Index batch) const {
    Decoder d;
    d.reserve(blocks_.size());
    for (const Block& b : blocks_)
      d.push_back(detail::start_decoding(b, batch));
    return d;
  }
  const Block& operator[](Index i) const { return blocks_[static_cast<std::size_t>(i)]; }

 private:
  template <class F>
  void visit(Index i, F&& f) {
    f(blocks_[static_cast<std::size_t>(i)]);
  }
  template <class F>
  void visit(Index i, F&& f) const {
    f(blocks_[static_cast<std::size_t>(i)]);
  }
  template <class Self, class D, class F>
  static void visit_decoding_in(Self& self, Index i, D& d, F& f) {
    detail::require(d.size() == self.blocks_.size(), name, "decoder",
                    "not made by this stack's start_decoding", "a decoder from start_decoding");
    f(self.blocks_[static_cast<std::size_t>(i)], d[static_cast<std::size_t>(i)]);
  }
  template <class F>
  void visit_decoding(Index i, Decoder& d, F&& f) {
    visit_decoding_in(*this, i, d, f);
  }
  template <class F>
  void visit_decoding(Index i, const Decoder& d, F&& f) const {
    visit_decoding_in(*this, i, d, f);
  }

  std::deque<Block> blocks_;  // built in place: a block need not be movable
};

}  // namespace effattn

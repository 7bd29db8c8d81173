#pragma once
// Residual<L>: y = x + L(x), the skip connection around a transformer sub-layer.

#include <cstdint>
#include <string_view>

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/composition.hpp"
#include "effattn/layers/detail/decoding.hpp"
#include "effattn/layers/layer.hpp"

namespace effattn {

/// y = x + F(x). F must map d columns to d columns (checked when built).
template <class F>
class Residual : public detail::Wrapper<F> {
  static_assert(detail::assert_layer<F>(), "Residual<F>: F must be a layer");

 public:
  using Scalar = typename F::Scalar;
  using S = Scalar;
  static constexpr bool position_wise = F::position_wise;
  static constexpr std::string_view parameter_group = detail::parameter_group<F>();

  struct Config {
    typename F::Config layer{};  ///< the wrapped layer's
    Config reseeded(std::uint64_t salt) const { return {detail::reseed(layer, salt)}; }
  };

  explicit Residual(Config config) : detail::Wrapper<F>(config.layer) {
    detail::require(fn_.d_in() == fn_.d_out(), "Residual", "layer",
                    detail::concat("a layer from ", fn_.d_in(), " to ", fn_.d_out(), " columns"),
                    "a layer whose output is as wide as its input");
  }

  Index d_in() const { return fn_.d_in(); }
  Index d_out() const { return fn_.d_in(); }
  void set_training(bool on) { fn_.set_training(on); }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_call("Residual", x, d_in(), "y", y, d_out(), shape);
    this->check_call(shape, false);
    fn_.forward(x, y, shape);
    y += x;
  }
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("Residual", x, d_in(), dy, d_out(), dx, shape);
    this->check_call(shape, true);
    fn_.backward(x, dy, dx, shape);
    dx += dy;
  }
  /// Incremental decoding: y = x + F's decode of x.
  using Decoder = detail::DecoderOf<F>;
  Decoder start_decoding(Index batch) const { return detail::start_decoding(fn_, batch); }
  void check_decode(Index rows, const Decoder& decoder) const {
    detail::check_decode(fn_, rows, decoder);
  }
  void decode(ConstView<S> x, View<S> y, Decoder& decoder) {
    detail::require_call("Residual", x, d_in(), "y", y, d_out(), SequenceShape{1, x.rows(), {}});
    check_decode(x.rows(), decoder);
    detail::decode(fn_, x, y, decoder);
    y += x;
  }

  template <class V>
  void visit_parameters(V&& f) {
    fn_.visit_parameters(f);  // the residual adds none: its layer's names, unchanged
  }

 private:
  using detail::Wrapper<F>::fn_;
};

}  // namespace effattn

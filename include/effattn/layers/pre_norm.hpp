#pragma once
// PreNorm<L>: y = L(LayerNorm(x)), the pre-norm arrangement of a transformer sub-layer.

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/layers/activation_meter.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/composition.hpp"
#include "effattn/layers/detail/decoding.hpp"
#include "effattn/layers/layer.hpp"
#include "effattn/layers/layer_norm.hpp"
#include "effattn/layers/layer_workspace.hpp"

namespace effattn {

/// y = F(LayerNorm(x)), the pre-norm arrangement (Reformer, GPT-2): the norm has F's input
/// width. A training forward keeps LayerNorm(x) as F's input for backward.
template <class F>
class PreNorm : public detail::Wrapper<F> {
  static_assert(detail::assert_layer<F>(), "PreNorm<F>: F must be a layer");

 public:
  using Scalar = typename F::Scalar;
  using S = Scalar;
  static constexpr bool position_wise = F::position_wise;
  static constexpr std::string_view parameter_group = detail::parameter_group<F>();
  static_assert(parameter_group != "norm",
                "effattn: PreNorm<L> files its own norm's parameters under 'norm.', so L cannot be "
                "a norm (its parameters would have the same names).");

  struct Config {
    typename F::Config layer{};  ///< the wrapped layer's
    double eps = 1e-5;           ///< the norm's
    Config reseeded(std::uint64_t salt) const { return {detail::reseed(layer, salt), eps}; }
  };

  explicit PreNorm(Config config)
      : detail::Wrapper<F>(config.layer), norm_({.d_model = fn_.d_in(), .eps = config.eps}) {}

  Index d_in() const { return fn_.d_in(); }
  Index d_out() const { return fn_.d_out(); }
  LayerNorm<S>& norm() { return norm_; }

  void set_training(bool on) {
    training_ = on;
    norm_.set_training(on);
    fn_.set_training(on);
    if (!on) release_activations();
  }
  void release_activations() {
    z_.resize(0, 0);
    held_.set(0);
    norm_.release_activations();
    fn_.release_activations();
  }
  std::size_t activation_bytes() const {
    return sizeof(S) * static_cast<std::size_t>(z_.size()) + norm_.activation_bytes() +
           fn_.activation_bytes();
  }
  void zero_grad() {
    norm_.zero_grad();
    fn_.zero_grad();
  }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_call("PreNorm", x, d_in(), "y", y, d_out(), shape);
    check_call(shape, false);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    View<S> z = training_ ? (z_.resize(x.rows(), d_in()), View<S>(z_))
                          : View<S>(ws.matrix<S>(x.rows(), d_in()));
    norm_.forward(x, z, shape);
    fn_.forward(z, y, shape);
    held_.set(sizeof(S) * static_cast<std::size_t>(z_.size()));
  }
  bool training() const { return training_; }

  /// Incremental decoding: F's decode of LayerNorm(x). Not in training mode.
  using Decoder = detail::DecoderOf<F>;
  Decoder start_decoding(Index batch) const { return detail::start_decoding(fn_, batch); }
  void check_decode(Index rows, const Decoder& decoder) const {
    detail::require_not_training(*this, "PreNorm");
    detail::check_decode(fn_, rows, decoder);
  }
  void decode(ConstView<S> x, View<S> y, Decoder& decoder) {
    const SequenceShape shape{1, x.rows(), {}};
    detail::require_call("PreNorm", x, d_in(), "y", y, d_out(), shape);
    check_decode(x.rows(), decoder);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    auto z = ws.matrix<S>(x.rows(), d_in());
    norm_.forward(x, z, shape);
    detail::decode(fn_, z, y, decoder);
  }

  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("PreNorm", x, d_in(), dy, d_out(), dx, shape);
    check_call(shape, true);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    auto dz = ws.matrix<S>(x.rows(), d_in());
    fn_.backward(z_, dy, dz, shape);
    norm_.backward(x, dz, dx, shape);
  }
  void check_call(const SequenceShape& shape, bool backward) const {
    if (backward) {
      detail::require_forward(training_ && z_.rows() == shape.tokens(), "PreNorm");
      detail::check_call(norm_, shape, true);
    }
    detail::check_call(fn_, shape, backward);
  }

  template <class V>
  void visit_parameters(V&& f) {
    detail::visit_prefixed(norm_, "norm", f);
    detail::visit_prefixed(fn_, parameter_group, f);
  }
  template <class V>
  void visit_random_state(V&& f) {
    detail::visit_random_state_of(fn_, parameter_group, f);
  }

 private:
  using detail::Wrapper<F>::fn_;
  LayerNorm<S> norm_;
  Matrix<S> z_;  // LayerNorm(x), kept by a training forward
  HeldActivations held_;
  bool training_ = false;
};

}  // namespace effattn

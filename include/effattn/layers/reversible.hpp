#pragma once
// Reversible<F, G>: the RevNet residual of the Reformer, which rebuilds its input from its
// output so that a stack of them trains in memory independent of depth.

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/layers/activation_meter.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/composition.hpp"
#include "effattn/layers/detail/decoding.hpp"
#include "effattn/layers/layer.hpp"
#include "effattn/layers/layer_workspace.hpp"

namespace effattn {

/// On [tokens × 2d] = [x1 | x2] (docs/algorithms.md §5):
///   y1 = x1 + F(x2),   y2 = x2 + G(y1);   inverse: x2 = y2 − G(y1),  x1 = y1 − F(x2).
/// F and G map d columns to d. Forward never keeps activations of F or G.
/// backward_from_output(y, dy) rebuilds the input from the output, recomputing G(y1) and
/// F(x2) in training mode just long enough for their own backward, so a stack of these
/// (Repeat, Sequential) holds only its top output, whatever its depth. Recomputation must
/// reproduce the forward: do not redraw a policy's random features or rotations between a
/// forward and its backward. Used alone in training, the block keeps its output (T × 2d).
/// No argument may share memory with another (the library's rule; an Error says so). F and G are
/// built from the configs as given (give them different seeds); Repeat and Sequential give every
/// block its own seeds.
template <class F, class G>
class Reversible {
  static_assert(detail::assert_layer<F>(), "Reversible<F, G>: F must be a layer");
  static_assert(detail::assert_layer<G>(), "Reversible<F, G>: G must be a layer");
  static_assert(std::same_as<typename F::Scalar, typename G::Scalar>,
                "effattn: Reversible<F, G> needs F and G of the same Scalar.");

 public:
  using Scalar = typename F::Scalar;
  using S = Scalar;
  static constexpr bool position_wise = F::position_wise && G::position_wise;
  static constexpr bool reversible = true;

  struct Config {
    typename F::Config f{};
    typename G::Config g{};
    Config reseeded(std::uint64_t salt) const {
      return {detail::reseed(f, 2 * salt), detail::reseed(g, 2 * salt + 1)};
    }
  };

  explicit Reversible(Config config) : f_(config.f), g_(config.g) {
    const Index d = f_.d_in();
    detail::require(f_.d_out() == d, "Reversible", "f",
                    detail::concat("a layer from ", d, " to ", f_.d_out(), " columns"),
                    "a layer whose output is as wide as its input");
    detail::require(g_.d_in() == d && g_.d_out() == d, "Reversible", "g",
                    detail::concat("a layer from ", g_.d_in(), " to ", g_.d_out(), " columns"),
                    detail::concat("a layer from ", d, " to ", d, " columns, as f"));
  }

  Index d_in() const { return 2 * half(); }
  Index d_out() const { return 2 * half(); }
  Index half() const { return f_.d_in(); }
  F& f() { return f_; }
  G& g() { return g_; }

  void set_training(bool on) {
    training_ = on;
    if (!on) release_activations();
  }
  void release_activations() {
    y_.resize(0, 0);
    held_.set(0);
  }
  std::size_t activation_bytes() const { return sizeof(S) * static_cast<std::size_t>(y_.size()); }
  bool training() const { return training_; }
  void zero_grad() {
    f_.zero_grad();
    g_.zero_grad();
  }
  void set_dropout(bool on) {
    detail::propagate_dropout(f_, on);
    detail::propagate_dropout(g_, on);
  }
  /// F and G run forward in every call (backward recomputes them); backward through the
  /// Layer interface also needs the output of a training forward.
  void check_call(const SequenceShape& shape, bool backward) const {
    if (backward) detail::require_forward(training_ && y_.rows() == shape.tokens(), "Reversible");
    detail::check_call(f_, shape, false);
    detail::check_call(g_, shape, false);
  }

  template <class V>
  void visit_parameters(V&& v) {
    detail::visit_prefixed(f_, "f", v);
    detail::visit_prefixed(g_, "g", v);
  }
  template <class V>
  void visit_random_state(V&& v) {
    detail::visit_random_state_of(f_, "f", v);
    detail::visit_random_state_of(g_, "g", v);
  }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    check(x, "x", "y", y, shape);
    check_call(shape, false);
    const Index d = half();
    f_.forward(x.rightCols(d), y.leftCols(d), shape);
    y.leftCols(d) += x.leftCols(d);
    g_.forward(y.leftCols(d), y.rightCols(d), shape);
    y.rightCols(d) += x.rightCols(d);
    if (training_) {
      y_ = y;
      held_.set(activation_bytes());
    }
  }

  /// Incremental decoding: F's and G's decoders; decode(x, y, decoder) computes the forward's
  /// y1 = x1 + F(x2), y2 = x2 + G(y1) on the next tokens. Not in training mode.
  struct Decoder {
    detail::DecoderOf<F> f;
    detail::DecoderOf<G> g;
  };
  Decoder start_decoding(Index batch) const {
    return {detail::start_decoding(f_, batch), detail::start_decoding(g_, batch)};
  }
  void check_decode(Index rows, const Decoder& decoder) const {
    detail::require_not_training(*this, "Reversible");
    detail::check_decode(f_, rows, decoder.f);
    detail::check_decode(g_, rows, decoder.g);
  }
  void decode(ConstView<S> x, View<S> y, Decoder& decoder) {
    check(x, "x", "y", y, SequenceShape{1, x.rows(), {}});
    check_decode(x.rows(), decoder);
    const Index d = half();
    detail::decode(f_, x.rightCols(d), y.leftCols(d), decoder.f);
    y.leftCols(d) += x.leftCols(d);
    detail::decode(g_, y.leftCols(d), y.rightCols(d), decoder.g);
    y.rightCols(d) += x.rightCols(d);
  }

  /// x = the input whose forward is y.
  void inverse(ConstView<S> y, View<S> x, const SequenceShape& shape) {
    check(y, "y", "x", x, shape);
    check_call(shape, false);
    const Index d = half();
    undo(g_, y.leftCols(d), y.rightCols(d), x.rightCols(d), shape);  // x2 = y2 − G(y1)
    undo(f_, x.rightCols(d), y.leftCols(d), x.leftCols(d), shape);   // x1 = y1 − F(x2)
  }

  /// From the output y and its gradient dy: writes the input x and its gradient dx, and
  /// adds to F's and G's parameter gradients.
  void backward_from_output(ConstView<S> y, ConstView<S> dy, View<S> x, View<S> dx,
                            const SequenceShape& shape) {
    detail::require_backward_from_output_call("Reversible", y, d_out(), dy, x, dx, d_in(), shape);
    check_call(shape, false);
    const Index d = half();
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    auto part = ws.matrix<S>(y.rows(), d);
    // x2 = y2 − G(y1); dx1 = dy1 + (∂G/∂y1)ᵀ dy2.
    undo(g_, y.leftCols(d), y.rightCols(d), x.rightCols(d), shape, dy.rightCols(d), part);
    dx.leftCols(d) = dy.leftCols(d) + part;
    // x1 = y1 − F(x2); dx2 = dy2 + (∂F/∂x2)ᵀ dx1.
    undo(f_, x.rightCols(d), y.leftCols(d), x.leftCols(d), shape, dx.leftCols(d), part);
    dx.rightCols(d) = dy.rightCols(d) + part;
  }

  /// The Layer interface: from the output kept by the training forward.
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("Reversible", x, d_in(), dy, d_out(), dx, shape);
    check_call(shape, true);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    auto rebuilt = ws.matrix<S>(x.rows(), d_in());
    backward_from_output(y_, dy, rebuilt, dx, shape);
  }

 private:
  template <class Out>
  void check(ConstView<S> in, const char* in_name, const char* out_name, const Out& out,
             const SequenceShape& shape) const {
    detail::require_call("Reversible", in, d_in(), out_name, out, d_out(), shape, in_name);
  }

  // rebuilt = sum − H(in); with a gradient d_sum, also d_in = (∂H/∂in)ᵀ d_sum (H trains
  // only for that call, then releases what it kept).
  template <class H>
  static void undo(H& h, ConstView<S> in, ConstView<S> sum, View<S> rebuilt,
                   const SequenceShape& shape) {
    h.forward(in, rebuilt, shape);
    rebuilt = sum - rebuilt;
  }
  template <class H>
  static void undo(H& h, ConstView<S> in, ConstView<S> sum, View<S> rebuilt,
                   const SequenceShape& shape, ConstView<S> d_sum, View<S> d_in) {
    h.set_training(true);
    undo(h, in, sum, rebuilt, shape);
    h.backward(in, d_sum, d_in, shape);
    h.set_training(false);
  }

  F f_;
  G g_;
  Matrix<S> y_;  // the output, kept by a training forward when used alone
  HeldActivations held_;
  bool training_ = false;
};

}  // namespace effattn

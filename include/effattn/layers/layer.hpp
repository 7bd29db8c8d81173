#pragma once
// The Layer and ReversibleLayer concepts, built from small named requirements (as
// AttentionPolicy is), and the compile-time check that names the one a type misses.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "effattn/attention/attention_policy.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

namespace detail {
/// The callable a Layer's visit_parameters must accept: f(name, value, gradient).
template <class S>
struct ParameterSink {
  void operator()(std::string_view, Matrix<S>&, Matrix<S>&) const {}
};
}  // namespace detail

/// `using Scalar = float;` (or double).
template <class L>
concept LayerHasScalar = requires {
  typename L::Scalar;
}
&&std::floating_point<typename L::Scalar>;

/// A nested `Config` and construction from it.
template <class L>
concept LayerIsConstructible = requires {
  typename L::Config;
}
&&std::constructible_from<L, typename L::Config>;

/// Widths in and out (`d_in()`, `d_out()`), and `static constexpr bool position_wise`:
/// whether output row t depends on input row t only.
template <class L>
concept LayerStatesShape = requires(const L& l) {
  { l.d_in() } -> std::convertible_to<Index>;
  { l.d_out() } -> std::convertible_to<Index>;
  { L::position_wise } -> std::convertible_to<bool>;
};

/// forward(x, y, shape) and backward(x, dy, dx, shape): backward of the last training
/// forward, given the same x; it writes dx and adds to the parameters' gradients.
template <class L>
concept LayerRuns = LayerHasScalar<L> &&
    requires(L& l, ConstView<typename L::Scalar> x, View<typename L::Scalar> y,
             const SequenceShape& shape) {
  l.forward(x, y, shape);
  l.backward(x, x, y, shape);
};

/// set_training(bool), release_activations(), activation_bytes() (held for backward now),
/// zero_grad() and visit_parameters(f) with f(name, value, gradient).
template <class L>
concept LayerTrains = LayerHasScalar<L> &&
    requires(L& l, const L& cl, bool on, detail::ParameterSink<typename L::Scalar> f) {
  l.set_training(on);
  l.release_activations();
  { cl.activation_bytes() } -> std::convertible_to<std::size_t>;
  l.zero_grad();
  l.visit_parameters(f);
};

/// A layer maps [tokens × d_in] to [tokens × d_out], trains, and composes: everything in
/// layers/ is one, MultiHeadAttention included.
template <class L>
concept Layer = LayerHasScalar<L> && LayerIsConstructible<L> && LayerStatesShape<L> &&
    LayerRuns<L> && LayerTrains<L>;

/// A layer that can rebuild its input from its output: `static constexpr bool reversible`,
/// inverse(y, x, shape) and backward_from_output(y, dy, x, dx, shape), which needs no
/// training forward (Reversible and stacks of them).
template <class L>
concept ReversibleLayer = Layer<L> &&
    requires(L& l, ConstView<typename L::Scalar> y, View<typename L::Scalar> x,
             const SequenceShape& shape) {
  requires bool(L::reversible);
  l.inverse(y, x, shape);
  l.backward_from_output(y, y, x, x, shape);
};

namespace detail {

/// One static_assert per requirement, naming the wrapper that needed a layer. An attention
/// policy gets one message of its own (it is the usual mistake) and no other.
template <class L>
constexpr bool assert_layer() {
  constexpr bool policy = AttentionPolicy<L>;
  static_assert(!policy,
                "effattn: this type is an attention policy, not a layer: a policy computes one "
                "head; wrap it in the multi-head block, e.g. "
                "PreNorm<MultiHeadAttention<FullAttention<float>>> instead of "
                "PreNorm<FullAttention<float>>.");
  static_assert(policy || LayerHasScalar<L>,
                "effattn: this type is not a layer: it needs `using Scalar = float;` (or double). "
                "See effattn/layers/layer.hpp.");
  static_assert(policy || LayerIsConstructible<L>,
                "effattn: this type is not a layer: it needs a nested `Config` and a constructor "
                "from it.");
  static_assert(policy || LayerStatesShape<L>,
                "effattn: this type is not a layer: it needs `d_in()`, `d_out()` and static "
                "constexpr `position_wise`.");
  static_assert(policy || LayerRuns<L>,
                "effattn: this type is not a layer: it needs `forward(x, y, shape)` and "
                "`backward(x, dy, dx, shape)`.");
  static_assert(policy || LayerTrains<L>,
                "effattn: this type is not a layer: it needs `set_training`, "
                "`release_activations`, `activation_bytes`, `zero_grad` and "
                "`visit_parameters(f)`.");
  return true;
}

}  // namespace detail
}  // namespace effattn

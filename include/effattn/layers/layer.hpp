#pragma once
// The Layer concept, built from small named requirements (as AttentionPolicy is), and the
// helpers every composing layer shares: seeding sub-layers apart and naming parameters.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "effattn/core/concepts.hpp"
#include "effattn/core/error.hpp"
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

/// A sub-layer's config with its seed moved to an independent stream: a Config with a
/// `seed` gets a mixed seed, a composite Config (with `reseeded(salt)`) passes the salt
/// on, and a Config with neither (no randomness) is returned as it is.
inline std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t salt) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (salt + 1);  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
template <class C>
C reseed(C config, std::uint64_t salt) {
  if constexpr (requires { config.reseeded(salt); })
    return config.reseeded(salt);
  else if constexpr (requires { config.seed = std::uint64_t{}; }) {
    config.seed = mix_seed(config.seed, salt);
    return config;
  } else
    return config;
}

/// Checks that a matrix argument is rows × cols.
template <class M>
void require_matrix(const char* component, const char* argument, const M& m, Index rows,
                    Index cols) {
  require(m.rows() == rows && m.cols() == cols, component, argument,
          concat("a ", m.rows(), "×", m.cols(), " matrix"),
          concat("a ", rows, "×", cols, " matrix"));
}

/// Checks a layer call: the input (`x_name`, default x) is [shape.tokens() × d_in] and the
/// output y (or dx) is [tokens × width], in memory of its own.
template <class X, class Y>
void require_call(const char* component, const X& x, Index d_in, const char* y_name, const Y& y,
                  Index y_cols, const SequenceShape& shape, const char* x_name = "x") {
  require(x.cols() == d_in, component, x_name, concat("a matrix of ", x.cols(), " columns"),
          concat(x_name[0] == 'x' ? "d_in = " : "d_out = ", d_in, " columns"));
  shape.validate(component, "shape", x.rows());
  require_matrix(component, y_name, y, x.rows(), y_cols);
  require_disjoint(component, y_name, y, x_name, x);
}

/// Checks a layer's backward(x, dy, dx, shape): as require_call, and dy is [tokens × d_out]
/// and dx shares memory with neither x nor dy.
template <class X, class DY, class DX>
void require_backward_call(const char* component, const X& x, Index d_in, const DY& dy, Index d_out,
                           const DX& dx, const SequenceShape& shape) {
  require_call(component, x, d_in, "dx", dx, d_in, shape);
  require_matrix(component, "dy", dy, x.rows(), d_out);
  require_disjoint(component, "dx", dx, "dy", dy);
}

/// Checks backward_from_output(y, dy, x, dx, shape) of a reversible layer or stack: y and dy
/// are inputs, x and dx outputs, and no output shares memory with another argument.
template <class Y, class DY, class X, class DX>
void require_backward_from_output_call(const char* component, const Y& y, Index d_out, const DY& dy,
                                       const X& x, const DX& dx, Index d_in,
                                       const SequenceShape& shape) {
  require_call(component, y, d_out, "x", x, d_in, shape, "y");
  require_matrix(component, "dy", dy, y.rows(), d_out);
  require_matrix(component, "dx", dx, y.rows(), d_in);
  require_disjoint(component, "x", x, "dy", dy);
  require_disjoint(component, "dx", dx, "y", y);
  require_disjoint(component, "dx", dx, "dy", dy);
  require_disjoint(component, "dx", dx, "x", x);
}

/// A layer may have `check_call(shape, backward) const`: it throws the Error its forward
/// (backward = false) or backward (true) would throw for this shape beyond the widths and
/// rows every layer checks, and changes nothing. Stacks and wrappers run it on everything
/// they hold before their first write, so a rejected call leaves the whole model as it
/// was. A layer without one accepts every shape its widths allow.
template <class L>
void check_call(const L& layer, const SequenceShape& shape, bool backward) {
  if constexpr (requires { layer.check_call(shape, backward); }) layer.check_call(shape, backward);
}

/// Backward needs a training forward before it.
inline void require_forward(bool ok, const char* component) {
  require(ok, component, "backward", "called without a preceding training forward",
          "set_training(true), then forward, then backward");
}

/// Visits a sub-layer's parameters as "<prefix>.<name>".
template <class L, class F>
void visit_prefixed(L& layer, std::string_view prefix, F& f) {
  layer.visit_parameters([&](std::string_view name, auto& value, auto& gradient) {
    std::string full;
    full.reserve(prefix.size() + 1 + name.size());
    full.append(prefix).append(".").append(name);
    f(std::string_view(full), value, gradient);
  });
}

/// What a layer that wraps one sub-layer `fn` forwards to it unchanged.
template <class F>
class Wrapper {
  static_assert(assert_layer<F>());

 public:
  using Scalar = typename F::Scalar;
  F& fn() { return fn_; }
  const F& fn() const { return fn_; }
  void release_activations() { fn_.release_activations(); }
  std::size_t activation_bytes() const { return fn_.activation_bytes(); }
  void zero_grad() { fn_.zero_grad(); }
  void check_call(const SequenceShape& shape, bool backward) const {
    detail::check_call(fn_, shape, backward);
  }

 protected:
  explicit Wrapper(const typename F::Config& config) : fn_(config) {}
  F fn_;
};

/// A layer without parameters or activations (moving columns around).
class Stateless {
 public:
  void set_training(bool) {}
  void release_activations() {}
  std::size_t activation_bytes() const { return 0; }
  void zero_grad() {}
  template <class F>
  void visit_parameters(F&&) {}
};

}  // namespace detail
}  // namespace effattn

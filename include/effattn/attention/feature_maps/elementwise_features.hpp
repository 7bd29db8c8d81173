#pragma once
// ElementwiseFeatures<F>: Performer's generalised kernels, φ(x) = f(W x)/√m.

#include <cmath>

#include <concepts>
#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

/// A function and its derivative, for ElementwiseFeatures.
template <class F>
concept ElementwiseFunction = requires(double x) {
  { F::value(x) } -> std::convertible_to<double>;
  { F::derivative(x) } -> std::convertible_to<double>;
};

/// Generalised kernels (Performer's "generalised attention"): φ(x) = f(W x)/√m for an
/// elementwise f. Not an estimate of softmax; no stabiliser. f must be non-negative for the
/// attention weights to be, and is applied to W x as it is (no ‖x‖ term).
template <ElementwiseFunction F>
struct ElementwiseFeatures {
  static constexpr const char* name = [] {
    if constexpr (requires { F::name; })
      return F::name;
    else
      return "elementwise";
  }();
  static constexpr Index width = 1;
  static constexpr bool estimates_softmax = false;
  static constexpr double default_epsilon = 1e-3;  ///< as upstream's generalised kernels

  template <class S>
  static S log_max(const S*, Index, S) {
    return 0;
  }
  template <class S>
  static void apply(const S* z, Index m, S /*h*/, S /*shift*/, S* phi) {
    const S norm = S(1) / std::sqrt(S(m));
    for (Index j = 0; j < m; ++j)
      phi[j] = norm * static_cast<S>(F::value(z[j]));
  }
  template <class S>
  static S backward(const S* z, Index m, S /*h*/, const S* /*phi*/, const S* d_phi, S* d_z) {
    const S norm = S(1) / std::sqrt(S(m));
    for (Index j = 0; j < m; ++j)
      d_z[j] = d_phi[j] * norm * static_cast<S>(F::derivative(z[j]));
    return 0;
  }
};

}  // namespace effattn

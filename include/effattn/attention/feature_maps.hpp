#pragma once
// Feature maps φ for kernelised attention (Performer, ALGORITHMS.md §2), one type each.
//
// Every map works on one row at a time, from the row's projections z = W x (m values, W the
// random features) and half its squared norm h = ‖x‖²/2, and has three static functions:
//   log_max(z, m, h)                      the log of the row's largest feature before the
//                                         1/√m factor: what the stabiliser subtracts
//   apply(z, m, h, shift, phi)            phi = φ(x)·exp(−shift), width·m values
//   backward(z, m, h, phi, d_phi, d_z)    d_z (m values) from d_phi; returns dL/dh
// The shift is the FAVOR+ stabiliser: queries use their own row's log_max, keys one value
// at least as large as every key's; it cancels in attention's normalisation. apply needs
// shift ≥ log_max (every exponent ≤ 0, so exp never overflows). Maps that are not built on
// exp ignore the shift and report log_max 0.

#include <algorithm>
#include <cmath>
#include <concepts>

#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

namespace detail {
template <class S>
void scale_in_place(S* v, Index n, S factor) {
  for (Index j = 0; j < n; ++j)
    v[j] *= factor;
}
}  // namespace detail

/// FAVOR+'s positive softmax features: φ(x) = exp(W x − ‖x‖²/2)/√m, E[φ(x)·φ(y)] = exp(x·y).
struct PositiveSoftmaxFeatures {
  static constexpr const char* name = "positive";
  static constexpr Index width = 1;  ///< features per random direction
  static constexpr bool estimates_softmax = true;
  static constexpr double default_epsilon = 1e-6;  ///< added to every feature (as upstream)

  template <class S>
  static S log_max(const S* z, Index m, S h) {
    return Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(z, m).maxCoeff() - h;
  }
  template <class S>
  static void apply(const S* z, Index m, S h, S shift, S* phi) {
    std::copy(z, z + m, phi);
    detail::exp_shifted_sum(phi, m, h + shift);
    detail::scale_in_place(phi, m, S(1) / std::sqrt(S(m)));
  }
  template <class S>
  static S backward(const S* /*z*/, Index m, S /*h*/, const S* phi, const S* d_phi, S* d_z) {
    S d_h = 0;
    for (Index j = 0; j < m; ++j) {
      d_z[j] = d_phi[j] * phi[j];
      d_h -= d_z[j];
    }
    return d_h;
  }
};

/// Hyperbolic positive features (lower variance, 2m features):
/// φ(x) = exp(−‖x‖²/2)/√(2m) · [exp(W x), exp(−W x)], E[φ(x)·φ(y)] = exp(x·y).
struct HyperbolicSoftmaxFeatures {
  static constexpr const char* name = "hyperbolic";
  static constexpr Index width = 2;
  static constexpr bool estimates_softmax = true;
  static constexpr double default_epsilon = 1e-6;

  template <class S>
  static S log_max(const S* z, Index m, S h) {
    return Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(z, m).abs().maxCoeff() - h;
  }
  template <class S>
  static void apply(const S* z, Index m, S h, S shift, S* phi) {
    for (Index j = 0; j < m; ++j) {
      phi[j] = z[j];
      phi[m + j] = -z[j];
    }
    detail::exp_shifted_sum(phi, 2 * m, h + shift);
    detail::scale_in_place(phi, 2 * m, S(1) / std::sqrt(S(2 * m)));
  }
  template <class S>
  static S backward(const S* /*z*/, Index m, S /*h*/, const S* phi, const S* d_phi, S* d_z) {
    S d_h = 0;
    for (Index j = 0; j < m; ++j) {
      const S plus = d_phi[j] * phi[j], minus = d_phi[m + j] * phi[m + j];
      d_z[j] = plus - minus;
      d_h -= plus + minus;
    }
    return d_h;
  }
};

/// Trigonometric features (the original random Fourier features for the softmax kernel;
/// unbiased but unstable, kept for comparison): φ(x) = exp(‖x‖²/2)/√m · [sin(W x), cos(W x)].
struct TrigonometricFeatures {
  static constexpr const char* name = "trigonometric";
  static constexpr Index width = 2;
  static constexpr bool estimates_softmax = true;
  static constexpr double default_epsilon = 0;  // features may be negative: no ε

  template <class S>
  static S log_max(const S* /*z*/, Index /*m*/, S h) {
    return h;  // |sin|, |cos| ≤ 1
  }
  template <class S>
  static void apply(const S* z, Index m, S h, S shift, S* phi) {
    const S factor = std::exp(h - shift) / std::sqrt(S(m));
    for (Index j = 0; j < m; ++j) {
      phi[j] = factor * std::sin(z[j]);
      phi[m + j] = factor * std::cos(z[j]);
    }
  }
  template <class S>
  static S backward(const S* /*z*/, Index m, S /*h*/, const S* phi, const S* d_phi, S* d_z) {
    S d_h = 0;
    for (Index j = 0; j < m; ++j) {
      d_z[j] = d_phi[j] * phi[m + j] - d_phi[m + j] * phi[j];
      d_h += d_phi[j] * phi[j] + d_phi[m + j] * phi[m + j];
    }
    return d_h;
  }
};

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

/// f(x) = max(x, 0) (derivative 1 for x > 0, else 0).
struct Relu {
  static constexpr const char* name = "relu";
  static double value(double x) { return x > 0 ? x : 0; }
  static double derivative(double x) { return x > 0 ? 1 : 0; }
};

/// Performer-ReLU: φ(x) = max(W x, 0)/√m.
using ReluFeatures = ElementwiseFeatures<Relu>;

}  // namespace effattn

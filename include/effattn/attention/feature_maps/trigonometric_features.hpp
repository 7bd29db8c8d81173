#pragma once
// TrigonometricFeatures: random Fourier features for the softmax kernel (for comparison).

#include <cmath>

#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

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

static_assert(FeatureMap<TrigonometricFeatures>);

}  // namespace effattn

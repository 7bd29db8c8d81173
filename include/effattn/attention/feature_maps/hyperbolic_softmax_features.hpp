#pragma once
// HyperbolicSoftmaxFeatures: positive random features in ±W x pairs (2m features).

#include <cmath>

#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

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

static_assert(FeatureMap<HyperbolicSoftmaxFeatures>);

}  // namespace effattn

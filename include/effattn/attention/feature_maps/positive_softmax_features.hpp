#pragma once
// PositiveSoftmaxFeatures: FAVOR+'s positive random features for the softmax kernel.

#include <cmath>

#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

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

static_assert(FeatureMap<PositiveSoftmaxFeatures>);

}  // namespace effattn

#pragma once
// ReluFeatures: Performer-ReLU, φ(x) = max(W x, 0)/√m.

#include <cmath>

#include "effattn/attention/feature_maps/elementwise_features.hpp"
#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

/// f(x) = max(x, 0) (derivative 1 for x > 0, else 0).
struct Relu {
  static constexpr const char* name = "relu";
  static double value(double x) { return x > 0 ? x : 0; }
  static double derivative(double x) { return x > 0 ? 1 : 0; }
};

/// Performer-ReLU: φ(x) = max(W x, 0)/√m.
using ReluFeatures = ElementwiseFeatures<Relu>;

static_assert(FeatureMap<ReluFeatures>);

}  // namespace effattn

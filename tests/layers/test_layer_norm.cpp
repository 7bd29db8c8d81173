// LayerNorm against a naive double reference and finite differences.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

namespace {
MatD naive_layer_norm(const MatD& x, const MatD& gamma, const MatD& beta, double eps) {
  MatD y(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    double mean = 0, var = 0;
    for (Index c = 0; c < x.cols(); ++c)
      mean += x(t, c) / double(x.cols());
    for (Index c = 0; c < x.cols(); ++c)
      var += (x(t, c) - mean) * (x(t, c) - mean) / double(x.cols());
    for (Index c = 0; c < x.cols(); ++c)
      y(t, c) = (x(t, c) - mean) / std::sqrt(var + eps) * gamma(0, c) + beta(0, c);
  }
  return y;
}
}  // namespace

TEST_CASE("LayerNorm matches a naive double reference, forward and backward", "[layers]") {
  const SequenceShape shape{2, 7, {}};
  LayerNorm<double> norm({.d_model = 6, .eps = 1e-5});
  randomise(norm, 3);
  const Matrix<double> x = random<double>(14, 6, 1, 2.0);
  Matrix<double> y(14, 6);
  norm.forward(x, y, shape);
  const auto p = parameters(norm);
  CHECK(reference::relative_error(y, naive_layer_norm(x, p.at("gamma"), p.at("beta"), 1e-5)) <
        1e-13);

  LayerNorm<float> norm_f({.d_model = 6, .eps = 1e-5});
  randomise(norm_f, 3);
  Matrix<float> y_f(14, 6);
  norm_f.forward(x.cast<float>(), y_f, shape);
  CHECK(reference::relative_error(y_f, y) < 1e-5);

  check_gradients(norm, x, shape);
}

// FeedForward (ReLU and GELU) against a naive double reference and finite differences.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

namespace {
double naive_activation(double x, Activation a) {
  if (a == Activation::relu) return x > 0 ? x : 0;
  const double pi = 3.14159265358979323846;
  return 0.5 * x * (1 + std::tanh(std::sqrt(2 / pi) * (x + 0.044715 * x * x * x)));
}
}  // namespace

TEST_CASE("FeedForward matches a naive double reference (ReLU and GELU)", "[layers]") {
  const SequenceShape shape{1, 9, {}};
  for (Activation act : {Activation::relu, Activation::gelu}) {
    CAPTURE(int(act));
    FeedForward<double> ff({.d_model = 5, .d_ff = 11, .activation = act, .seed = 4});
    randomise(ff, 10);
    const Matrix<double> x = random<double>(9, 5, 2);
    Matrix<double> y(9, 5);
    ff.forward(x, y, shape);
    const auto p = parameters(ff);
    MatD h = x * p.at("w_1");
    for (Index t = 0; t < h.rows(); ++t)
      for (Index c = 0; c < h.cols(); ++c)
        h(t, c) = naive_activation(h(t, c) + p.at("b_1")(0, c), act);
    MatD expected = h * p.at("w_2");
    expected.rowwise() += p.at("b_2").row(0);
    CHECK(reference::relative_error(y, expected) < 1e-13);

    FeedForward<float> ff_f({.d_model = 5, .d_ff = 11, .activation = act, .seed = 4});
    randomise(ff_f, 10);
    Matrix<float> y_f(9, 5);
    ff_f.forward(x.cast<float>(), y_f, shape);
    CHECK(reference::relative_error(y_f, expected) < 1e-5);

    check_gradients(ff, x, shape);
  }
  // defaults: d_ff = 4·d_model, weights seeded
  FeedForward<float> a({.d_model = 4}), b({.d_model = 4}), c({.d_model = 4, .seed = 1});
  CHECK(a.d_ff() == 16);
  CHECK(parameters(a) == parameters(b));
  CHECK(parameters(a).at("w_1") != parameters(c).at("w_1"));
}

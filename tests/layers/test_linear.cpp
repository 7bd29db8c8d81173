// Linear against a naive double reference and finite differences.
#include <catch2/catch.hpp>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

TEST_CASE("Linear matches a naive double reference, forward and backward", "[layers]") {
  for (const bool bias : {true, false}) {
    CAPTURE(bias);
    Linear<double> linear({.d_in = 5, .d_out = 7, .bias = bias, .seed = 2});
    randomise(linear, 4);
    const SequenceShape shape{2, 3, {}};
    const Matrix<double> x = random<double>(6, 5, 1);
    Matrix<double> y(6, 7);
    linear.forward(x, y, shape);
    const auto p = parameters(linear);
    MatD expected(6, 7);
    for (Index t = 0; t < 6; ++t)
      for (Index o = 0; o < 7; ++o) {
        double s = bias ? p.at("b")(0, o) : 0.0;
        for (Index i = 0; i < 5; ++i)
          s += x(t, i) * p.at("w")(i, o);
        expected(t, o) = s;
      }
    CHECK(reference::relative_error(y, expected) < 1e-14);
    CHECK(parameter_paths(linear) ==
          (bias ? std::vector<std::string>{"w", "b"} : std::vector<std::string>{"w"}));
    check_gradients(linear, x, shape);

    Linear<float> linear_f({.d_in = 5, .d_out = 7, .bias = bias, .seed = 2});
    randomise(linear_f, 4);
    Matrix<float> y_f(6, 7);
    linear_f.forward(x.cast<float>(), y_f, shape);
    CHECK(reference::relative_error(y_f, expected) < 1e-5);
  }
  CHECK_THROWS_AS(Linear<float>({.d_in = 0}), Error);
  Linear<float> linear({.d_in = 4, .d_out = 3});
  Matrix<float> x(2, 5), y(2, 3);
  CHECK_THROWS_AS(linear.forward(x, y, {1, 2, {}}), Error);
}

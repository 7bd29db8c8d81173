// Residual and PreNorm: x + L(x) and L(LayerNorm(x)), with their gradients.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

TEST_CASE("Residual and PreNorm compute x + F(x) and F(LayerNorm(x)), and train", "[layers]") {
  const SequenceShape shape{2, 6, {3, 6}};
  const Matrix<double> x = random<double>(12, 8, 11);
  Residual<FeedForward<double>> res({.layer = {.d_model = 8, .d_ff = 12, .seed = 3}});
  FeedForward<double> ff({.d_model = 8, .d_ff = 12, .seed = 3});
  Matrix<double> y(12, 8), f(12, 8);
  res.forward(x, y, shape);
  ff.forward(x, f, shape);
  CHECK(reference::relative_error(y, x + f) < 1e-15);

  PreNorm<Attn<double>> pre({.layer = {.d_model = 8, .heads = 2, .seed = 5}});
  randomise(pre, 30);
  LayerNorm<double> norm({.d_model = 8});
  Attn<double> attn({.d_model = 8, .heads = 2, .seed = 5});
  const auto p = parameters(pre);
  norm.visit_parameters(
      [&](std::string_view name, auto& w, auto&) { w = p.at("norm." + std::string(name)); });
  attn.visit_parameters(
      [&](std::string_view name, auto& w, auto&) { w = p.at("attention." + std::string(name)); });
  Matrix<double> z(12, 8), expected(12, 8);
  norm.forward(x, z, shape);
  attn.forward(z, expected, shape);
  pre.forward(x, y, shape);
  CHECK(reference::relative_error(y, expected) < 1e-15);

  check_gradients(pre, x, shape);
  Residual<PreNorm<FeedForward<double>>> res_pre(
      {.layer = {.layer = {.d_model = 8, .d_ff = 16, .seed = 2}}});
  randomise(res_pre, 40);
  check_gradients(res_pre, x, shape);
}

#pragma once
// What the layer tests share: random inputs, randomised parameters, finite-difference
// gradient checks, and a small reversible block.

#include <catch2/catch.hpp>

#include <cmath>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "effattn/effattn.hpp"
#include "reference.hpp"

namespace layer_testing {

using namespace effattn;
using reference::MatD;

template <class S>
Matrix<S> random(Index rows, Index cols, std::uint64_t seed, double sd = 1.0) {
  Matrix<S> m(rows, cols);
  CounterRng(seed).fill_normal(m, sd);
  return m;
}

// Gives every parameter (biases, gamma, beta included) random values, so no gradient
// check passes because a bias is 0 or gamma is 1.
template <class L>
void randomise(L& layer, std::uint64_t seed) {
  layer.visit_parameters(
      [&](std::string_view, auto& w, auto&) { CounterRng(seed++).fill_normal(w, 0.5); });
}

// Finite differences of loss = Σ y ⊙ g against backward, for x and every parameter. Padded
// rows are not part of the loss (their g is 0): their dy is ignored (core/sequence_shape.hpp).
template <class L>
void check_gradients(L& layer, Matrix<double> x, const SequenceShape& shape, double tol = 1e-7) {
  Matrix<double> y(x.rows(), layer.d_out()), dx(x.rows(), layer.d_in());
  Matrix<double> g = random<double>(x.rows(), layer.d_out(), 99);
  shape.zero_padding(g);
  layer.set_training(false);
  auto loss = [&] {
    layer.forward(x, y, shape);
    return y.cwiseProduct(g).sum();
  };
  std::vector<MatD> numeric;
  layer.visit_parameters([&](std::string_view, Matrix<double>& w, auto&) {
    numeric.push_back(reference::numeric_gradient(loss, w));
  });
  const MatD num_x = reference::numeric_gradient(loss, x);
  layer.set_training(true);
  layer.zero_grad();
  layer.forward(x, y, shape);
  layer.backward(x, g, dx, shape);
  CHECK(reference::gradient_error(dx, num_x) < tol);
  std::size_t i = 0;
  layer.visit_parameters([&](std::string_view name, auto&, Matrix<double>& grad) {
    CAPTURE(name);
    CHECK(reference::gradient_error(grad, numeric[i++]) < tol);
  });
  layer.set_training(false);
}

template <class L>
std::vector<Matrix<double>> gradients(L& layer) {
  std::vector<Matrix<double>> out;
  layer.visit_parameters(
      [&](std::string_view, auto&, auto& g) { out.push_back(g.template cast<double>()); });
  return out;
}

// Parameters of a layer by name, as doubles.
template <class L>
std::map<std::string, MatD> parameters(L& layer) {
  std::map<std::string, MatD> out;
  layer.visit_parameters([&](std::string_view name, auto& w, auto&) {
    out[std::string(name)] = w.template cast<double>();
  });
  return out;
}

template <class S>
using Attn = MultiHeadAttention<FullAttention<S>, Causal>;
template <class S>
using Block = Reversible<PreNorm<Attn<S>>, PreNorm<Chunked<FeedForward<S>>>>;

template <class S>
typename Block<S>::Config block_config(Index d = 8) {
  return {.f = {.layer = {.d_model = d, .heads = 2, .seed = 1}},
          .g = {.layer = {.layer = {.d_model = d, .d_ff = 2 * d, .seed = 2}, .chunk = 5}}};
}

}  // namespace layer_testing

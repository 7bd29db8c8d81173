// clip_grad_norm against the norm computed naively, and a real model trained with it.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "effattn/effattn.hpp"
#include "effattn/training/adam.hpp"
#include "effattn/training/clip_grad_norm.hpp"
#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

namespace {
template <class L>
double naive_norm(L& layer) {
  double sum = 0;
  layer.visit_parameters([&](std::string_view, auto&, auto& g) {
    for (Index r = 0; r < g.rows(); ++r)
      for (Index c = 0; c < g.cols(); ++c)
        sum += double(g(r, c)) * double(g(r, c));
  });
  return std::sqrt(sum);
}
}  // namespace

TEST_CASE("clip_grad_norm scales all gradients together, only above the bound", "[training]") {
  FeedForward<float> ff({.d_model = 6, .d_ff = 10, .seed = 1});
  LayerNorm<float> norm({.d_model = 6});
  auto fill = [&] {
    std::uint64_t seed = 40;
    auto set = [&](std::string_view, auto&, auto& g) { CounterRng(seed++).fill_normal(g, 2.0); };
    ff.visit_parameters(set);
    norm.visit_parameters(set);
  };
  fill();
  const double total = std::hypot(naive_norm(ff), naive_norm(norm));
  CHECK(grad_norm(ff, norm) == Approx(total).epsilon(1e-6));
  const auto before = gradients(ff);

  CHECK(clip_grad_norm(2 * total, ff, norm) == Approx(total).epsilon(1e-6));
  const auto unclipped = gradients(ff);
  for (std::size_t i = 0; i < before.size(); ++i)
    CHECK(unclipped[i] == before[i]);  // below the bound: untouched

  CHECK(clip_grad_norm(1.0, ff, norm) == Approx(total).epsilon(1e-6));
  CHECK(grad_norm(ff, norm) == Approx(1.0).epsilon(1e-5));
  const auto clipped = gradients(ff);
  for (std::size_t i = 0; i < before.size(); ++i)  // one factor for every tensor
    CHECK(reference::relative_error(clipped[i], before[i] * (1.0 / total)) < 1e-5);

  // A NaN gradient: the norm says so, and nothing is scaled.
  fill();
  norm.visit_parameters([](std::string_view name, auto&, auto& g) {
    if (name == "beta") g(0, 2) = std::numeric_limits<float>::quiet_NaN();
  });
  const auto with_nan = gradients(ff);
  CHECK(std::isnan(clip_grad_norm(1.0, ff, norm)));
  const auto after = gradients(ff);
  for (std::size_t i = 0; i < with_nan.size(); ++i)
    CHECK(after[i] == with_nan[i]);

  CHECK_THROWS_AS(clip_grad_norm(0.0, ff), Error);
  CHECK_THROWS_AS(clip_grad_norm(std::nan(""), ff), Error);
}

TEST_CASE("Adam with clipping trains a residual feed-forward block to fit a target", "[training]") {
  // y = x + FF(LN(x)) fitted to a fixed random map of x by mean squared error: a real model's
  // parameters, reached through their paths, move the loss down by orders of magnitude.
  using Block = Residual<PreNorm<FeedForward<double>>>;
  Block block({.layer = {.layer = {.d_model = 8, .d_ff = 32, .seed = 3}}});
  const SequenceShape shape{1, 16, {}};
  const Matrix<double> x = random<double>(16, 8, 1);
  const Matrix<double> target = x + 0.5 * (x * random<double>(8, 8, 2)).array().tanh().matrix();
  Matrix<double> y(16, 8), dx(16, 8);
  Adam<double> adam({.lr = 3e-3});
  block.set_training(true);
  auto loss_and_grad = [&] {
    block.zero_grad();
    block.forward(x, y, shape);
    const Matrix<double> dy = (y - target) / double(y.size());
    block.backward(x, dy, dx, shape);
    return 0.5 * (y - target).squaredNorm() / double(y.size());
  };
  const double first = loss_and_grad();
  double loss = first;
  for (int step = 0; step < 300; ++step) {
    clip_grad_norm(1.0, block);
    adam.step(block);
    loss = loss_and_grad();
  }
  INFO("loss " << first << " -> " << loss);
  CHECK(loss < first / 20);
  CHECK(adam.steps("norm.gamma") == 300);
  CHECK(adam.steps("feed_forward.w_1") == 300);
}

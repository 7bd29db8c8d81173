// The two pieces of process-wide state, layer_workspace() (one per thread) and
// activation_meter() (one per process), shared by every model: models interleaved in one
// thread compute exactly what each computes alone, the workspace holds nothing between calls
// and its peak is the largest single call's, and the meter adds up what every model holds.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

namespace {
using ModelA = Repeat<Residual<PreNorm<MultiHeadAttention<FullAttention<double>, Causal>>>>;
using ModelB = Repeat<
    Reversible<PreNorm<MultiHeadAttention<Favor<double>>>, PreNorm<Chunked<FeedForward<double>>>>>;
const ModelA::Config config_a{.block = {.layer = {.layer = {.d_model = 8, .heads = 2}}},
                              .depth = 2};
const ModelB::Config config_b{
    .block = {.f = {.layer = {.d_model = 6, .heads = 2, .policy = {.features = 8}}},
              .g = {.layer = {.layer = {.d_model = 6, .d_ff = 12}, .chunk = 5}}},
    .depth = 2};

struct Run {
  Matrix<double> y, dx;
  std::vector<Matrix<double>> grads;
};
}  // namespace

TEST_CASE("Two models interleaved in one thread share the layer workspace and the meter safely",
          "[layers][shared_state]") {
  const SequenceShape shape_a{2, 10, {10, 6}}, shape_b{1, 14, {}};
  const Matrix<double> xa = random<double>(20, 8, 1), dya = random<double>(20, 8, 2);
  const Matrix<double> xb = random<double>(14, 12, 3), dyb = random<double>(14, 12, 4);
  Workspace& ws = layer_workspace();
  const std::size_t base = activation_meter().in_use();

  // Each alone: its results and the most scratch one of its calls takes.
  auto alone = [&](auto model, const Matrix<double>& x, const Matrix<double>& dy,
                   const SequenceShape& shape, std::size_t& peak) {
    Run run{Matrix<double>(x.rows(), x.cols()), Matrix<double>(x.rows(), x.cols()), {}};
    ws.reset_peak();
    model.set_training(true);
    model.forward(x, run.y, shape);
    model.backward(x, dy, run.dx, shape);
    run.grads = gradients(model);
    peak = ws.peak_bytes();
    return run;
  };
  std::size_t peak_a = 0, peak_b = 0;
  const Run ra = alone(ModelA(config_a), xa, dya, shape_a, peak_a);
  const Run rb = alone(ModelB(config_b), xb, dyb, shape_b, peak_b);

  // Interleaved: A and B both trained forward, an inference model run between, then both
  // backward in the other order.
  ModelA a(config_a), c(config_a);
  ModelB b(config_b);
  a.set_training(true);
  b.set_training(true);
  Matrix<double> ya(20, 8), yb(14, 12), yc(20, 8), dxa(20, 8), dxb(14, 12);
  ws.reset_peak();
  a.forward(xa, ya, shape_a);
  CHECK(ws.in_use() == 0);  // nothing of a call stays in the workspace
  b.forward(xb, yb, shape_b);
  CHECK(activation_meter().in_use() == base + a.activation_bytes() + b.activation_bytes());
  CHECK(a.activation_bytes() > 0);
  CHECK(b.activation_bytes() > 0);
  c.forward(xa, yc, shape_a);
  b.backward(xb, dyb, dxb, shape_b);
  CHECK(activation_meter().in_use() == base + a.activation_bytes() + b.activation_bytes());
  a.backward(xa, dya, dxa, shape_a);
  CHECK(ws.in_use() == 0);
  CHECK(ws.peak_bytes() <= std::max(peak_a, peak_b));  // not the sum: one call at a time

  CHECK(ya == ra.y);
  CHECK(yc == ra.y);
  CHECK(dxa == ra.dx);
  CHECK(yb == rb.y);
  CHECK(dxb == rb.dx);
  CHECK(gradients(a) == ra.grads);
  CHECK(gradients(b) == rb.grads);

  a.set_training(false);
  b.set_training(false);
  CHECK(activation_meter().in_use() == base);
}

TEST_CASE("One block used from two threads at once is an Error, never a wrong answer", "[layers]") {
  // Documented as unsupported; the guard turns it into an Error in the second caller.
  detail::ExclusiveUse guard;
  {
    const auto scope = guard.enter("Test");
    CHECK_THROWS_AS(guard.enter("Test"), Error);
  }
  { const auto again = guard.enter("Test"); }  // free once the first call ended

  auto run = [](auto& block, Index n) {
    using S = typename std::decay_t<decltype(block)>::Scalar;
    const Index d = block.d_in();
    const SequenceShape shape{1, n, {}};
    const Matrix<S> x = random<S>(n, d, 7);
    Matrix<S> expected(n, d);
    block.forward(x, expected, shape);
    std::atomic<int> refused{0}, wrong{0}, done{0};
    auto worker = [&] {
      Matrix<S> y(n, d);
      for (int i = 0; i < 20; ++i) {
        try {
          block.forward(x, y, shape);
          if (y != expected) ++wrong;
          ++done;
        } catch (const Error& e) {
          CHECK(std::string(e.what()).find("two threads") != std::string::npos);
          ++refused;
        }
      }
    };
    std::thread a(worker), b(worker);
    a.join();
    b.join();
    CHECK(wrong == 0);
    CHECK(done + refused == 40);
    CHECK(done > 0);
  };
  MultiHeadAttention<FullAttention<float>> full({.d_model = 32, .heads = 2, .seed = 1});
  run(full, 256);
  MultiHeadAttention<Favor<float>, Causal> favor({.d_model = 32, .heads = 2, .seed = 1});
  run(favor, 256);
  MultiHeadAttention<LSHAttention<float>> lsh(
      {.d_model = 32, .heads = 2, .seed = 1, .policy = {.chunk = 16, .buckets = 8}});
  run(lsh, 256);
}

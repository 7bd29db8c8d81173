// Favor (FAVOR+) against naive references: the kernelised O(n²) attention with the same W,
// and exact softmax attention for the approximation properties.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "effattn/attention/favor.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/layers/multi_head_attention.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

struct Case {
  Index n_q, n_k, d, d_v;
  bool causal;
  Index key_length;  // -1: all
  Index chunk;
};

template <class S, class Map>
Matrix<S> run(const Favor<S, Map>& favor, const Matrix<S>& q, const Matrix<S>& k,
              const Matrix<S>& v, const HeadContext& ctx) {
  Matrix<S> out(q.rows(), v.cols());
  Workspace ws;
  ws.reserve(favor.scratch_bytes(q.rows(), k.rows(), q.cols(), v.cols()));
  favor.forward(q, k, v, out, nullptr, ctx, ws);
  CHECK(ws.growths() == 0);
  return out;
}

HeadContext context_of(const Case& c) {
  return {0, 0, 0, c.key_length < 0 ? c.n_k : c.key_length, c.n_k - c.n_q, c.causal};
}

const Case cases[] = {
    {1, 1, 4, 3, false, -1, 8},
    {37, 37, 8, 5, false, -1, 16},
    {37, 37, 8, 5, true, -1, 16},
    {20, 45, 6, 4, false, -1, 7},
    {40, 40, 8, 8, true, 29, 16},
    {40, 40, 8, 8, false, 29, 64},
    {33, 33, 16, 16, true, -1, 1},
    // Padding shorter than the chunk, causal: the key block must hold a whole query chunk.
    {100, 100, 8, 8, true, 60, 128},
    {50, 50, 4, 3, true, 7, 16},
    {50, 50, 4, 3, true, 0, 16},
    {20, 20, 4, 3, true, 1, 64},
    {20, 20, 4, 3, false, 3, 64},
    // Several causal blocks (8 chunks each): padding inside one and covering the last.
    {70, 70, 8, 5, true, 45, 4},
    {70, 70, 8, 5, true, -1, 2},
};

}  // namespace

TEMPLATE_TEST_CASE("Favor equals the naive kernelised attention with the same features", "[favor]",
                   PositiveSoftmaxFeatures, HyperbolicSoftmaxFeatures, TrigonometricFeatures,
                   ReluFeatures) {
  using Map = TestType;
  for (const Case& c : cases) {
    CAPTURE(c.n_q, c.n_k, c.causal, c.key_length, c.chunk);
    Matrix<double> q(c.n_q, c.d), k(c.n_k, c.d), v(c.n_k, c.d_v);
    CounterRng(1).fill_normal(q, 0.7);
    CounterRng(2).fill_normal(k, 0.7);
    CounterRng(3).fill_normal(v);
    const Favor<double, Map> favor({.features = 24, .chunk = c.chunk, .epsilon = 0.0},
                                   HeadLayout{1, c.d, c.d_v, 5});
    const MatD expected = reference::naive_favor<Map>(q, k, v, favor.projection(0),
                                                      {c.causal, context_of(c).key_length, 0});
    CHECK(reference::relative_error(run(favor, q, k, v, context_of(c)), expected) < 1e-11);

    // float: same W, rounded
    const Favor<float, Map> favor_f({.features = 24, .chunk = c.chunk, .epsilon = 0.0},
                                    HeadLayout{1, c.d, c.d_v, 5});
    const Matrix<float> qf = q.cast<float>(), kf = k.cast<float>(), vf = v.cast<float>();
    // Trigonometric features cancel (signed terms), which costs float digits.
    const double float_tolerance = std::is_same_v<Map, TrigonometricFeatures> ? 5e-3 : 2e-4;
    CHECK(reference::relative_error(run(favor_f, qf, kf, vf, context_of(c)), expected) <
          float_tolerance);
  }
}

TEST_CASE("Favor causal: future tokens and padded keys have no influence", "[favor]") {
  const Index n = 50, d = 8;
  const Favor<double> favor({.features = 32, .chunk = 16}, HeadLayout{1, d, d, 2});
  Matrix<double> q(n, d), k(n, d), v(n, d);
  CounterRng(1).fill_normal(q);
  CounterRng(2).fill_normal(k);
  CounterRng(3).fill_normal(v);
  const HeadContext causal{0, 0, 0, n, 0, true};
  const Matrix<double> before = run(favor, q, k, v, causal);
  Matrix<double> q2 = q, k2 = k, v2 = v;
  q2.bottomRows(20).setRandom();
  k2.bottomRows(20).array() *= 3.0;  // also moves the keys' stabiliser
  v2.bottomRows(20).setRandom();
  const Matrix<double> after = run(favor, q2, k2, v2, causal);
  CHECK(reference::relative_error(after.topRows(30), before.topRows(30)) < 1e-12);

  const HeadContext padded{0, 0, 0, 30, 0, false};
  const Matrix<double> p1 = run(favor, q, k, v, padded), p2 = run(favor, q, k2, v2, padded);
  CHECK(reference::relative_error(p2, p1) < 1e-12);
}

TEST_CASE("Favor causal: a future key with a huge feature leaves earlier outputs unchanged",
          "[favor][stabiliser]") {
  // Key t along W's first direction with norm d^{3/4} has log-feature ≈ d/2 = 128 above the
  // others': under one shift over all keys every earlier feature underflows in float.
  const Index n = 40, d = 256;
  // The key in a later block (of 8 chunks), in a later chunk, or in the same chunk.
  for (const Index chunk : {Index(2), Index(8), Index(64)}) {
    CAPTURE(chunk);
    const Favor<float> favor({.features = 64, .chunk = chunk}, HeadLayout{1, d, d, 7});
    Matrix<float> q(n, d), k(n, d), v(n, d);
    CounterRng(1).fill_normal(q, 0.3);
    CounterRng(2).fill_normal(k, 0.3);
    CounterRng(3).fill_normal(v);
    const HeadContext causal{0, 0, 0, n, 0, true};
    const Matrix<float> before = run(favor, q, k, v, causal);
    const Index t = 30;
    k.row(t) = favor.projection(0).row(0).normalized() * std::pow(float(d), 0.75f);
    const Matrix<float> after = run(favor, q, k, v, causal);
    CHECK(after.allFinite());
    CHECK(after.topRows(t) == before.topRows(t));  // not just close: no future key is read
    CHECK(before.topRows(t).norm() > 0);
    // Rows from t on follow the naive kernelised reference (in double, no stabiliser needed).
    const Favor<double> exact({.features = 64, .chunk = chunk, .epsilon = 0.0},
                              HeadLayout{1, d, d, 7});
    const MatD expected = reference::naive_favor<PositiveSoftmaxFeatures>(
        q.cast<double>(), k.cast<double>(), v.cast<double>(), exact.projection(0), {true, n, 0});
    CHECK(reference::relative_error(after.bottomRows(n - t), expected.bottomRows(n - t)) < 1e-4);
    // Gradients stay finite with the huge key (double: the backward sweeps rescale too).
    Matrix<double> dq(n, d), dk(n, d), dv(n, d);
    const Matrix<double> qd = q.cast<double>(), kd = k.cast<double>(), vd = v.cast<double>();
    const Matrix<double> out = run(exact, qd, kd, vd, causal);
    Workspace ws;
    exact.backward(qd, kd, vd, out, vd, {}, dq, dk, dv, causal, ws);
    CHECK((dq.allFinite() && dk.allFinite() && dv.allFinite()));
  }
}

TEMPLATE_TEST_CASE("Favor gradients match finite differences (double)", "[favor][backward]",
                   PositiveSoftmaxFeatures, HyperbolicSoftmaxFeatures, ReluFeatures) {
  using Map = TestType;
  for (const Case& c : {Case{9, 9, 4, 3, true, -1, 4}, Case{7, 11, 4, 3, false, 8, 4},
                        Case{12, 12, 3, 2, true, 10, 5}, Case{12, 12, 3, 2, true, 3, 5},
                        Case{10, 10, 3, 2, true, 4, 16},
                        // several causal blocks (8 chunks each), padding ending inside one
                        Case{30, 30, 3, 2, true, -1, 1}, Case{40, 40, 3, 2, true, 21, 1}}) {
    CAPTURE(c.causal, c.key_length);
    const Favor<double, Map> favor({.features = 10, .chunk = c.chunk, .epsilon = 0.0},
                                   HeadLayout{1, c.d, c.d_v, 3});
    Matrix<double> q(c.n_q, c.d), k(c.n_k, c.d), v(c.n_k, c.d_v), g(c.n_q, c.d_v);
    CounterRng(4).fill_normal(q, 0.8);
    CounterRng(5).fill_normal(k, 0.8);
    CounterRng(6).fill_normal(v);
    CounterRng(7).fill_normal(g);
    const HeadContext ctx = context_of(c);
    auto loss = [&] { return run(favor, q, k, v, ctx).cwiseProduct(g).sum(); };
    const Matrix<double> out = run(favor, q, k, v, ctx);
    Matrix<double> dq(c.n_q, c.d), dk(c.n_k, c.d), dv(c.n_k, c.d_v);
    Workspace ws;
    ws.reserve(favor.scratch_bytes(c.n_q, c.n_k, c.d, c.d_v));
    favor.backward(q, k, v, out, g, {}, dq, dk, dv, ctx, ws);
    CHECK(ws.growths() == 0);
    CHECK(reference::gradient_error(dq, reference::numeric_gradient(loss, q)) < 1e-7);
    CHECK(reference::gradient_error(dk, reference::numeric_gradient(loss, k)) < 1e-7);
    CHECK(reference::gradient_error(dv, reference::numeric_gradient(loss, v)) < 1e-7);
  }
}

TEST_CASE("Favor approximates softmax attention better as m grows, and ORF beats IID",
          "[favor][approximation]") {
  const Index n = 64, d = 16;
  Matrix<double> q(n, d), k(n, d), v(n, d);
  CounterRng(1).fill_normal(q, 0.5);
  CounterRng(2).fill_normal(k, 0.5);
  CounterRng(3).fill_normal(v);
  const MatD exact = reference::attention(q, k, v, 1.0 / std::sqrt(double(d)), {});
  const HeadContext ctx{0, 0, 0, n, 0, false};
  auto mean_error = [&](Index m, FeatureDirections directions) {
    double total = 0;
    const int seeds = 8;
    for (int s = 0; s < seeds; ++s) {
      const Favor<double> favor({.features = m, .directions = directions},
                                HeadLayout{1, d, d, std::uint64_t(100 + s)});
      total += reference::relative_error(run(favor, q, k, v, ctx), exact) / seeds;
    }
    return total;
  };
  double previous = std::numeric_limits<double>::infinity();
  for (const Index m : {16, 64, 256, 1024}) {
    const double orf = mean_error(m, FeatureDirections::orthogonal);
    const double iid = mean_error(m, FeatureDirections::iid);
    CAPTURE(m, orf, iid);
    CHECK(orf < previous);
    CHECK(orf < iid);
    previous = orf;
  }
  CHECK(previous < 0.1);  // 0.066 measured at m = 1024 (n = 64, d = 16, 8 seeds)
}

TEST_CASE("Favor: projection access, redraw, large inputs, bad configuration", "[favor]") {
  Favor<float> a({.features = 16}, HeadLayout{2, 8, 8, 1}),
      b({.features = 16}, HeadLayout{2, 8, 8, 2});
  CHECK(a.projections() == 1);
  CHECK(a.projection(0) == a.projection(1));  // shared by the heads
  CHECK(a.projection(0) != b.projection(0));
  b.set_projection(0, a.projection(0));
  CHECK(b.projection(0) == a.projection(0));
  const Matrix<float> before = a.projection(0);
  a.redraw(99);
  CHECK(a.projection(0) != before);
  Favor<float> per_head({.features = 16, .per_head = true}, HeadLayout{2, 8, 8, 1});
  CHECK(per_head.projections() == 2);
  CHECK(per_head.projection(0) != per_head.projection(1));

  // Inputs of norm 30 stay finite in float, both modes.
  const Index n = 64, d = 64;
  const Favor<float> favor({}, HeadLayout{1, d, d, 3});
  Matrix<float> q(n, d), k(n, d), v(n, d);
  CounterRng(1).fill_normal(q);
  CounterRng(2).fill_normal(k);
  CounterRng(3).fill_normal(v);
  q.rowwise().normalize();
  k.rowwise().normalize();
  q *= 30;
  k *= 30;
  for (const bool causal : {false, true})
    CHECK(run(favor, q, k, v, HeadContext{0, 0, 0, n, 0, causal}).allFinite());

  CHECK_THROWS_WITH(Favor<float>({.features = 0}, HeadLayout{1, 8, 8, 0}),
                    Catch::Contains("'features'"));
  CHECK_THROWS_WITH(Favor<float>({.chunk = -1}, HeadLayout{1, 8, 8, 0}),
                    Catch::Contains("'chunk'"));
  CHECK_THROWS_WITH(favor.validate(10, 12, d, d, true), Catch::Contains("causal FAVOR+"));
  CHECK_THROWS_WITH(favor.validate(10, 10, d + 1, d, false), Catch::Contains("'d_k'"));
  CHECK_THROWS_WITH(b.set_projection(0, Matrix<float>(16, 7)), Catch::Contains("16×8"));
}

TEST_CASE("Favor's automatic chunk: 64 tokens causal, 128 bidirectional", "[favor]") {
  const Index n = 300, d = 8;  // several chunks of either size, and a tail
  Matrix<float> q(n, d), k(n, d), v(n, d), d_out(n, d);
  CounterRng(21).fill_normal(q, 0.5);
  CounterRng(22).fill_normal(k, 0.5);
  CounterRng(23).fill_normal(v);
  CounterRng(24).fill_normal(d_out);
  const Favor<float> automatic({.features = 16}, HeadLayout{1, d, d, 5});
  CHECK(automatic.chunk(true) == 64);
  CHECK(automatic.chunk(false) == 128);
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const Favor<float> fixed({.features = 16, .chunk = causal ? 64 : 128}, HeadLayout{1, d, d, 5});
    const HeadContext ctx{0, 0, 0, n, 0, causal};
    Matrix<float> outs[2], grads[2][3];
    for (int which = 0; which < 2; ++which) {
      const Favor<float>& favor = which == 0 ? automatic : fixed;
      Workspace ws;
      ws.reserve(favor.scratch_bytes(n, n, d, d));
      Favor<float>::Saved saved;
      outs[which].resize(n, d);
      favor.forward(q, k, v, outs[which], &saved, ctx, ws);
      for (auto& g : grads[which])
        g.resize(n, d);
      favor.backward(q, k, v, outs[which], d_out, saved, grads[which][0], grads[which][1],
                     grads[which][2], ctx, ws);
      CHECK(ws.growths() == 0);  // the automatic chunk's scratch is planned for both modes
    }
    CHECK(outs[0] == outs[1]);
    for (int g = 0; g < 3; ++g)
      CHECK(grads[0][g] == grads[1][g]);
  }
}

TEST_CASE("MultiHeadAttention<Favor> trains: gradients match finite differences",
          "[favor][mha][backward]") {
  const SequenceShape shape{2, 9, {9, 7}};
  MultiHeadAttention<Favor<double>, Causal> block(
      {.d_model = 6, .heads = 2, .seed = 4, .policy = {.features = 8, .chunk = 4, .epsilon = 0.0}});
  Matrix<double> x(shape.tokens(), 6), g(shape.tokens(), 6), y(shape.tokens(), 6),
      dx(shape.tokens(), 6);
  CounterRng(8).fill_normal(x);
  CounterRng(9).fill_normal(g);
  shape.zero_padding(g);  // padded rows are not part of the loss
  auto loss = [&] {
    block.forward(x, y, shape);
    return y.cwiseProduct(g).sum();
  };
  block.set_training(true);
  block.forward(x, y, shape);
  block.backward(x, g, dx, shape);
  CHECK(reference::gradient_error(dx, reference::numeric_gradient(loss, x)) < 1e-7);
  block.visit_parameters([&](std::string_view name, Matrix<double>& value, Matrix<double>& grad) {
    CAPTURE(std::string(name));
    CHECK(reference::gradient_error(grad, reference::numeric_gradient(loss, value)) < 1e-7);
  });
}

// Randomized properties with fixed seeds: random shapes and configurations for every policy
// and masking (padding shorter and longer than every chunk or tile, n below the chunk, n not
// a multiple of any tile, n_q ≠ n_k, head widths 1 … 256), each against a naive double
// reference where an exact one exists, and gradients against finite differences on small
// sizes. Bounded: a fixed number of cases, seconds in all.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "effattn/effattn.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

// Integers and choices from a counter-based stream: the same cases on every platform.
class Dice {
 public:
  explicit Dice(std::uint64_t seed) : rng_(seed, 0xd1ce) {}
  Index between(Index lo, Index hi) {  // inclusive
    const double span = double(hi - lo + 1);
    return std::min(hi, lo + static_cast<Index>(rng_.uniform(next_++) * span));
  }
  bool coin() { return between(0, 1) == 1; }
  // Mostly small widths, sometimes up to 256.
  Index width() { return between(0, 4) == 0 ? between(65, 256) : between(1, 64); }

 private:
  CounterRng rng_;
  std::uint64_t next_ = 0;
};

template <class S>
Matrix<S> normal(Index rows, Index cols, std::uint64_t seed, double sd = 1.0) {
  Matrix<S> m(rows, cols);
  CounterRng(seed).fill_normal(m, sd);
  return m;
}

// One head through a policy as AttentionCore drives it: validate, plan the scratch, run.
template <class P, class S = typename P::Scalar>
Matrix<S> forward(const P& policy, const Matrix<S>& q, const Matrix<S>& k, const Matrix<S>& v,
                  const HeadContext& ctx, typename P::Saved* saved = nullptr) {
  policy.validate(q.rows(), k.rows(), q.cols(), v.cols(), ctx.causal);
  Workspace ws;
  ws.reserve(policy.scratch_bytes(q.rows(), k.rows(), q.cols(), v.cols()));
  Matrix<S> out(q.rows(), v.cols());
  policy.forward(q, k, v, out, saved, ctx, ws);
  CHECK(ws.growths() == 0);
  return out;
}

// Backward against central differences of loss = Σ out ⊙ g. With shared_qk the keys are the
// queries (as MultiHeadAttention passes them), so q's gradient is dq + dk.
template <class P>
void check_gradients(const P& policy, Matrix<double> q, Matrix<double> k, Matrix<double> v,
                     const HeadContext& ctx, bool shared_qk = false) {
  const Matrix<double> g = normal<double>(q.rows(), v.cols(), 77);
  auto saved = policy.make_saved(q.rows(), k.rows());
  const Matrix<double> out = forward(policy, q, k, v, ctx, &saved);
  Matrix<double> dq(q.rows(), q.cols()), dk(k.rows(), k.cols()), dv(v.rows(), v.cols());
  Workspace ws;
  ws.reserve(policy.scratch_bytes(q.rows(), k.rows(), q.cols(), v.cols()));
  policy.backward(q, k, v, out, g, saved, dq, dk, dv, ctx, ws);
  CHECK(ws.growths() == 0);
  auto loss = [&] { return forward(policy, q, shared_qk ? q : k, v, ctx).cwiseProduct(g).sum(); };
  if (shared_qk) {
    CHECK(reference::gradient_error(dq + dk, reference::numeric_gradient(loss, q)) < 1e-6);
  } else {
    CHECK(reference::gradient_error(dq, reference::numeric_gradient(loss, q)) < 1e-6);
    CHECK(reference::gradient_error(dk, reference::numeric_gradient(loss, k)) < 1e-6);
  }
  CHECK(reference::gradient_error(dv, reference::numeric_gradient(loss, v)) < 1e-6);
}

// Exact shared-QK attention (LSH with one bucket and one chunk): keys k̂ = q/‖q‖, a token
// sees itself only when nothing else is visible, padded rows give 0.
MatD shared_qk_attention(const MatD& q, const MatD& v, Index length, bool causal, double scale) {
  const Index n = q.rows();
  MatD out = MatD::Zero(n, v.cols());
  for (Index i = 0; i < length; ++i) {
    double max = -std::numeric_limits<double>::infinity();
    for (Index j = 0; j < length; ++j)
      if (j != i && (!causal || j <= i))
        max = std::max(max, scale * q.row(i).dot(q.row(j)) / q.row(j).norm());
    if (max == -std::numeric_limits<double>::infinity()) {
      out.row(i) = v.row(i);
      continue;
    }
    double sum = 0;
    for (Index j = 0; j < length; ++j)
      if (j != i && (!causal || j <= i)) {
        const double w = std::exp(scale * q.row(i).dot(q.row(j)) / q.row(j).norm() - max);
        out.row(i) += w * v.row(j);
        sum += w;
      }
    out.row(i) /= sum;
  }
  return out;
}

constexpr int cases = 100;

}  // namespace

TEST_CASE("Randomized: FullAttention equals naive attention for random shapes and masks",
          "[randomized][full]") {
  Dice dice(1);
  for (int c = 0; c < cases; ++c) {
    const Index n_q = dice.between(1, 300), n_k = dice.coin() ? n_q : dice.between(1, 300);
    const Index d = dice.width(), d_v = dice.coin() ? d : dice.width();
    const bool causal = dice.coin();
    const Index keys = dice.coin() ? n_k : dice.between(0, n_k);
    const FullAttention<float> attn({.query_tile = dice.coin() ? 0 : dice.between(1, 96),
                                     .key_tile = dice.coin() ? 0 : dice.between(1, 96)},
                                    HeadLayout{1, d, d_v, 0});
    CAPTURE(c, n_q, n_k, d, d_v, causal, keys, attn.config().query_tile, attn.config().key_tile);
    const Matrix<float> q = normal<float>(n_q, d, 3 * c), k = normal<float>(n_k, d, 3 * c + 1),
                        v = normal<float>(n_k, d_v, 3 * c + 2);
    const HeadContext ctx{0, 0, 0, keys, n_k - n_q, causal};
    const MatD expected =
        reference::attention(q.cast<double>(), k.cast<double>(), v.cast<double>(),
                             1.0 / std::sqrt(double(d)), {causal, keys, n_k - n_q});
    CHECK(reference::relative_error(forward(attn, q, k, v, ctx), expected) < 1e-5);
  }
  Dice small(2);
  for (int c = 0; c < 8; ++c) {
    const Index n_q = small.between(1, 9), n_k = small.coin() ? n_q : small.between(1, 9);
    const Index d = small.between(1, 4), keys = small.between(0, n_k);
    const bool causal = small.coin();
    CAPTURE(c, n_q, n_k, d, causal, keys);
    const FullAttention<double> attn({.query_tile = small.between(1, 4), .key_tile = 3},
                                     HeadLayout{1, d, d, 0});
    check_gradients(attn, normal<double>(n_q, d, 10 * c), normal<double>(n_k, d, 10 * c + 1),
                    normal<double>(n_k, d, 10 * c + 2),
                    HeadContext{0, 0, 0, keys, n_k - n_q, causal});
  }
}

TEMPLATE_TEST_CASE("Randomized: Favor equals its naive kernelised attention", "[randomized][favor]",
                   PositiveSoftmaxFeatures, ReluFeatures) {
  using Map = TestType;
  Dice dice(3);
  for (int c = 0; c < cases; ++c) {
    const bool causal = dice.coin();
    const Index n_q = dice.between(1, 300),
                n_k = causal || dice.coin() ? n_q : dice.between(1, 300);
    const Index d = dice.between(0, 5) == 0 ? dice.between(65, 256) : dice.between(1, 32);
    const Index d_v = dice.between(1, 32), keys = dice.coin() ? n_k : dice.between(0, n_k);
    const Index chunk = dice.between(1, 150), m = dice.between(1, 64);
    CAPTURE(c, n_q, n_k, d, d_v, causal, keys, chunk, m);
    const typename Favor<float, Map>::Config config{.features = m, .chunk = chunk, .epsilon = 0.0};
    const Favor<float, Map> favor(config, HeadLayout{1, d, d_v, std::uint64_t(c)});
    const Favor<double, Map> exact({.features = m, .chunk = chunk, .epsilon = 0.0},
                                   HeadLayout{1, d, d_v, std::uint64_t(c)});
    // Inputs of norm about 1 per row: the features' variance stays moderate at any d.
    const double sd = 1.0 / std::sqrt(double(d));
    const Matrix<float> q = normal<float>(n_q, d, 3 * c, sd),
                        k = normal<float>(n_k, d, 3 * c + 1, sd),
                        v = normal<float>(n_k, d_v, 3 * c + 2);
    const HeadContext ctx{0, 0, 0, keys, n_k - n_q, causal};
    const MatD expected =
        reference::naive_favor<Map>(q.cast<double>(), k.cast<double>(), v.cast<double>(),
                                    exact.projection(0), {causal, keys, 0});
    CHECK(reference::relative_error(forward(favor, q, k, v, ctx), expected) < 1e-3);
    CHECK(reference::relative_error(
              forward(exact, Matrix<double>(q.cast<double>()), Matrix<double>(k.cast<double>()),
                      Matrix<double>(v.cast<double>()), ctx),
              expected) < 1e-10);
  }
  Dice small(4);
  for (int c = 0; c < 8; ++c) {
    const bool causal = small.coin();
    const Index n_q = small.between(1, 9), n_k = causal ? n_q : small.between(1, 9);
    const Index d = small.between(1, 4), keys = small.between(0, n_k), chunk = small.between(1, 5);
    CAPTURE(c, n_q, n_k, d, causal, keys, chunk);
    const Favor<double, Map> favor({.features = 6, .chunk = chunk, .epsilon = 0.0},
                                   HeadLayout{1, d, 3, std::uint64_t(c)});
    check_gradients(favor, normal<double>(n_q, d, 10 * c, 0.7),
                    normal<double>(n_k, d, 10 * c + 1, 0.7), normal<double>(n_k, 3, 10 * c + 2),
                    HeadContext{0, 0, 0, keys, n_k - n_q, causal});
  }
}

TEST_CASE("Randomized: LSHAttention with one bucket and one chunk is exact shared-QK attention",
          "[randomized][lsh]") {
  Dice dice(5);
  for (int c = 0; c < cases; ++c) {
    const Index n = dice.between(1, 200), d = dice.width(), d_v = dice.between(1, 32);
    const Index length = dice.coin() ? n : dice.between(0, n);
    const bool causal = dice.coin();
    const Index rounds = dice.between(1, 3);
    CAPTURE(c, n, d, d_v, length, causal, rounds);
    const LSHAttention<float> lsh({.chunk = n, .rounds = rounds, .buckets = 1},
                                  HeadLayout{1, d, d_v, 0});
    const Matrix<float> q = normal<float>(n, d, 3 * c), v = normal<float>(n, d_v, 3 * c + 1);
    const MatD expected = shared_qk_attention(q.cast<double>(), v.cast<double>(), length, causal,
                                              1.0 / std::sqrt(double(d)));
    CHECK(reference::relative_error(forward(lsh, q, q, v, HeadContext{0, 0, 0, length, 0, causal}),
                                    expected) < 1e-5);
  }
  Dice small(6);
  for (int c = 0; c < 8; ++c) {
    const Index n = small.between(2, 9), d = small.between(1, 4), length = small.between(1, n);
    const bool causal = small.coin();
    CAPTURE(c, n, d, length, causal);
    const LSHAttention<double> lsh({.chunk = n, .rounds = small.between(1, 2), .buckets = 1},
                                   HeadLayout{1, d, 3, 0});
    const Matrix<double> q = normal<double>(n, d, 10 * c);
    check_gradients(lsh, q, q, normal<double>(n, 3, 10 * c + 1),
                    HeadContext{0, 0, 0, length, 0, causal}, true);
  }
}

TEST_CASE("Randomized: LowRank with identity projections at k = n is exact attention",
          "[randomized][lowrank]") {
  Dice dice(7);
  for (int c = 0; c < cases; ++c) {
    const Index n_q = dice.between(1, 200), n_k = dice.between(1, 200);
    const Index d = dice.width(), d_v = dice.between(1, 32);
    const Index keys = dice.coin() ? n_k : dice.between(0, n_k);
    CAPTURE(c, n_q, n_k, d, d_v, keys);
    LowRank<float> dense({.projection = {.k = n_k, .n_max = n_k}}, HeadLayout{1, d, d_v, 0});
    for (const bool values : {false, true})
      dense.projection(0, values).set_weight(Matrix<float>::Identity(n_k, n_k));
    const LowRank<float, MeanPooling> windows({.projection = {.kernel = 1}},
                                              HeadLayout{1, d, d_v, 0});
    const Matrix<float> q = normal<float>(n_q, d, 3 * c), k = normal<float>(n_k, d, 3 * c + 1),
                        v = normal<float>(n_k, d_v, 3 * c + 2);
    const HeadContext ctx{0, 0, 0, keys, n_k - n_q, false};
    const MatD expected = reference::attention(q.cast<double>(), k.cast<double>(), v.cast<double>(),
                                               1.0 / std::sqrt(double(d)), {false, keys, 0});
    // Windows of one token mask wholly padded windows; a dense E has no such rows (its
    // projected rows mix tokens), so it equals attention only without padding.
    CHECK(reference::relative_error(forward(windows, q, k, v, ctx), expected) < 1e-5);
    if (keys == n_k)
      CHECK(reference::relative_error(forward(dense, q, k, v, ctx), expected) < 1e-5);
  }
  Dice small(8);
  for (int c = 0; c < 8; ++c) {
    const Index n_q = small.between(1, 8), n_k = small.between(1, 8), d = small.between(1, 4);
    const Index keys = small.between(0, n_k);
    CAPTURE(c, n_q, n_k, d, keys);
    const LowRank<double> dense({.projection = {.k = small.between(1, n_k), .n_max = n_k}},
                                HeadLayout{1, d, 3, std::uint64_t(c)});
    check_gradients(dense, normal<double>(n_q, d, 10 * c), normal<double>(n_k, d, 10 * c + 1),
                    normal<double>(n_k, 3, 10 * c + 2), HeadContext{0, 0, 0, keys, 0, false});
  }
}

TEST_CASE("Randomized: AttentionCore over batches, heads and padding equals the reference",
          "[randomized][core]") {
  // Exercises the scheduling: (sequence, head) problems, split queries, per-sequence padding.
  Dice dice(9);
  for (int c = 0; c < 12; ++c) {
    const Index batch = dice.between(1, 3), heads = dice.between(1, 4);
    const Index n_q = dice.between(1, 260), n_k = dice.coin() ? n_q : dice.between(1, 260);
    const Index d = dice.between(1, 48), d_v = dice.between(1, 48);
    const bool causal = dice.coin();
    SequenceShape q_shape{batch, n_q, {}}, kv_shape{batch, n_k, {}};
    if (dice.coin())
      for (Index b = 0; b < batch; ++b)
        kv_shape.lengths.push_back(dice.between(0, n_k));
    CAPTURE(c, batch, heads, n_q, n_k, d, d_v, causal);
    const HeadLayout layout{heads, d, d_v, 0};
    const Matrix<float> q = normal<float>(batch * n_q, heads * d, 3 * c),
                        k = normal<float>(batch * n_k, heads * d, 3 * c + 1),
                        v = normal<float>(batch * n_k, heads * d_v, 3 * c + 2);
    Matrix<float> out(batch * n_q, heads * d_v);
    MatD expected(batch * n_q, heads * d_v);
    for (Index b = 0; b < batch; ++b)
      for (Index h = 0; h < heads; ++h)
        expected.block(b * n_q, h * d_v, n_q, d_v) = reference::attention(
            q.block(b * n_q, h * d, n_q, d).cast<double>(),
            k.block(b * n_k, h * d, n_k, d).cast<double>(),
            v.block(b * n_k, h * d_v, n_k, d_v).cast<double>(), 1.0 / std::sqrt(double(d)),
            {causal, kv_shape.valid_length(b), n_k - n_q});
    if (causal) {
      AttentionCore<FullAttention<float>, Causal> core({}, layout);
      core.forward(q, k, v, out, q_shape, kv_shape, false);
    } else {
      AttentionCore<FullAttention<float>, Bidirectional> core({}, layout);
      core.forward(q, k, v, out, q_shape, kv_shape, false);
    }
    CHECK(reference::relative_error(out, expected) < 1e-5);
  }
}

TEMPLATE_TEST_CASE("Repeated training calls give the same bits for every policy (fixed threads)",
                   "[randomized][determinism]", FullAttention<float>, Favor<float>,
                   LSHAttention<float>, LowRank<float>) {
  using Block = MultiHeadAttention<TestType>;
  typename Block::Config config{.d_model = 32, .heads = 4, .seed = 2};
  if constexpr (requires { config.policy.projection.n_max; })
    config.policy.projection = {.k = 16, .n_max = 96};
  Block block(config);
  const SequenceShape shape{3, 96, {96, 70, 33}};
  const Matrix<float> x = normal<float>(shape.tokens(), 32, 1),
                      dy = normal<float>(shape.tokens(), 32, 2);
  auto run = [&] {
    Matrix<float> y(shape.tokens(), 32), dx(shape.tokens(), 32);
    block.zero_grad();
    block.set_training(true);
    block.forward(x, y, shape);
    block.backward(x, dy, dx, shape);
    std::vector<Matrix<float>> all{y, dx};
    block.visit_parameters([&](std::string_view, auto&, Matrix<float>& g) { all.push_back(g); });
    return all;
  };
  const auto first = run(), second = run();
  REQUIRE(first.size() == second.size());
  for (std::size_t i = 0; i < first.size(); ++i)
    CHECK(first[i] == second[i]);
}

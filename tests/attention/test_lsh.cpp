// LSHAttention (Reformer) against naive double references: hashing, sorting, chunk windows,
// masks and the log-sum-exp combination of rounds, each written out with dense loops.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "effattn/attention/attention_core.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/attention/lsh.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/layers/multi_head_attention.hpp"
#include "layer_testing.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

using Config = LSHAttention<double>::Config;
constexpr double inf = std::numeric_limits<double>::infinity();

// argmax over [x ; −x], written as the concatenation it is.
Index argmax_pm(const Eigen::RowVectorXd& x) {
  Eigen::RowVectorXd both(2 * x.size());
  both << x, -x;
  Index best = 0;
  for (Index j = 1; j < both.size(); ++j)
    if (both[j] > both[best]) best = j;
  return best;
}

// Buckets of one round from the policy's rotation (padding: the extra bucket b).
template <class Policy>
std::vector<Index> naive_buckets(const Policy& policy, const MatD& k, Index head, Index round,
                                 Index length) {
  const Index n = k.rows();
  const auto plan = policy.plan(n);
  std::vector<Index> b(n, plan.buckets);
  const MatD r = policy.rotation(head, round, plan.columns()).template cast<double>();
  for (Index t = 0; t < length; ++t) {
    if (plan.buckets == 1) {
      b[t] = 0;
      continue;
    }
    const Eigen::RowVectorXd x = k.row(t) * r;
    if (plan.second == 1) {
      b[t] = argmax_pm(x);
    } else {
      const Index h1 = argmax_pm(x.head(plan.first / 2));
      const Index h2 = argmax_pm(x.segment(plan.first / 2, plan.second / 2));
      b[t] = h1 + plan.first * h2;
    }
  }
  return b;
}

// One round's chunks as sets of tokens, and which chunks each chunk's queries see.
struct NaiveRound {
  std::vector<Index> bucket, chunk_of;     // per token (chunk_of: −1 for padding)
  std::vector<std::vector<Index>> window;  // per chunk: the chunks it sees
  bool sees(Index i, Index j) const {
    if (chunk_of[i] < 0 || chunk_of[j] < 0) return false;
    const auto& w = window[static_cast<std::size_t>(chunk_of[i])];
    return std::find(w.begin(), w.end(), chunk_of[j]) != w.end();
  }
};

NaiveRound naive_round(std::vector<Index> bucket, Index length, const auto& c, bool causal) {
  const Index n = Index(bucket.size());
  std::vector<Index> order(n);
  for (Index t = 0; t < n; ++t)
    order[t] = t;
  std::stable_sort(order.begin(), order.end(),
                   [&](Index a, Index b) { return bucket[a] < bucket[b]; });
  // chunks over the valid sorted rows; causal: never across a bucket boundary
  std::vector<std::vector<Index>> chunks;
  for (Index s = 0; s < length; ++s) {
    const bool cut = chunks.empty() || Index(chunks.back().size()) == c.chunk ||
                     (causal && bucket[order[s]] != bucket[chunks.back().front()]);
    if (cut) chunks.emplace_back();
    chunks.back().push_back(order[s]);
  }
  NaiveRound r{bucket, std::vector<Index>(n, -1), {}};
  const Index count = Index(chunks.size());
  for (Index ci = 0; ci < count; ++ci) {
    for (Index t : chunks[ci])
      r.chunk_of[t] = ci;
    std::set<Index> seen;
    for (Index o = -c.look_back; o <= c.look_forward; ++o) {
      if (causal) {
        const Index cj = ci + o;
        if (cj >= 0 && cj < count && bucket[chunks[cj].front()] == bucket[chunks[ci].front()])
          seen.insert(cj);
      } else {
        seen.insert(((ci + o) % count + count) % count);
      }
    }
    r.window.emplace_back(seen.begin(), seen.end());
  }
  return r;
}

// The whole LSH attention of one head in double: per round softmax over the allowed keys,
// then the log-sum-exp combination of rounds.
template <class Policy>
MatD naive_lsh(const Policy& policy, const MatD& q, const MatD& k, const MatD& v, Index head,
               Index length, bool causal) {
  const auto& c = policy.config();
  const Index n = q.rows();
  const double scale = c.scale ? *c.scale : 1.0 / std::sqrt(double(q.cols()));
  std::vector<NaiveRound> rounds;
  for (Index r = 0; r < c.rounds; ++r)
    rounds.push_back(naive_round(naive_buckets(policy, k, head, r, length), length, c, causal));
  auto allowed = [&](const NaiveRound& r, Index i, Index j) {
    if (j >= length || !r.sees(i, j) || (causal && j > i)) return false;
    return !(c.same_bucket || causal) || r.bucket[i] == r.bucket[j];
  };
  MatD out = MatD::Zero(n, v.cols());
  for (Index i = 0; i < length; ++i) {
    std::vector<double> lse;
    std::vector<Eigen::RowVectorXd> o;
    for (const NaiveRound& r : rounds) {
      std::vector<std::pair<Index, double>> logits;
      for (Index j = 0; j < n; ++j) {
        if (!allowed(r, i, j)) continue;
        double s = scale * q.row(i).dot(k.row(j)) / k.row(j).norm();
        if (c.dedup) {
          Index shared = 0;
          for (const NaiveRound& r2 : rounds)
            shared += allowed(r2, i, j);
          s -= std::log(double(shared));
        }
        logits.emplace_back(j, j == i ? -1e5 : s);
      }
      double max = -inf;
      for (auto [j, s] : logits)
        max = std::max(max, s);
      double sum = 0;
      Eigen::RowVectorXd acc = Eigen::RowVectorXd::Zero(v.cols());
      for (auto [j, s] : logits) {
        sum += std::exp(s - max);
        acc += std::exp(s - max) * v.row(j);
      }
      lse.push_back(max + std::log(sum));
      o.push_back(acc / sum);
    }
    // weights exp(L_r − logsumexp_r L_r), with the largest L_r taken out first
    double top = -inf;
    for (double l : lse)
      top = std::max(top, l);
    double total = 0;
    for (double l : lse)
      total += std::exp(l - top);
    for (std::size_t r = 0; r < lse.size(); ++r)
      out.row(i) += std::exp(lse[r] - top) / total * o[r];
  }
  return out;
}

// Exact shared-QK attention with the self mask: keys k̂ = k/‖k‖, self only when alone.
MatD exact_shared_qk(const MatD& q, const MatD& k, const MatD& v, Index length, bool causal) {
  const Index n = q.rows();
  const double scale = 1.0 / std::sqrt(double(q.cols()));
  MatD out = MatD::Zero(n, v.cols());
  for (Index i = 0; i < length; ++i) {
    Eigen::VectorXd s = Eigen::VectorXd::Constant(n, -inf);
    for (Index j = 0; j < length; ++j)
      if (!causal || j <= i)
        s[j] = j == i ? -1e5 : scale * q.row(i).dot(k.row(j)) / k.row(j).norm();
    const Eigen::VectorXd p = (s.array() - s.maxCoeff()).exp().matrix();
    out.row(i) = p.transpose() * v / p.sum();
  }
  return out;
}

template <class S>
struct Head {
  Matrix<S> q, k, v, g;
  Head(Index n, Index d, Index dv, std::uint64_t seed) : q(n, d), k(n, d), v(n, dv), g(n, dv) {
    CounterRng(seed, 1).fill_normal(q);
    CounterRng(seed, 2).fill_normal(k);
    CounterRng(seed, 3).fill_normal(v);
    CounterRng(seed, 4).fill_normal(g);
  }
};

template <class S>
Matrix<S> run_head(const LSHAttention<S>& policy, const Matrix<S>& q, const Matrix<S>& k,
                   const Matrix<S>& v, Index length, bool causal,
                   typename LSHAttention<S>::Saved* saved = nullptr) {
  const Index n = q.rows();
  policy.validate(n, n, q.cols(), v.cols(), causal);
  Workspace ws;
  ws.reserve(policy.scratch_bytes(n, n, q.cols(), v.cols()));
  Matrix<S> out(n, v.cols());
  policy.forward(q, k, v, out, saved, HeadContext{0, 0, 0, length, 0, causal}, ws);
  CHECK(ws.growths() == 0);
  return out;
}

struct Case {
  Index n, length, chunk, rounds, buckets, back, forward;
  bool same_bucket, dedup;
};

const Case cases[] = {
    {1, 1, 4, 2, 0, 1, 0, false, false},        // one token
    {5, 5, 8, 3, 0, 1, 0, false, false},        // n < chunk
    {64, 64, 16, 2, 8, 1, 0, false, false},     // n a multiple of the chunk
    {70, 70, 16, 4, 0, 1, 0, false, false},     // n not a multiple of the chunk
    {70, 51, 16, 4, 6, 1, 1, false, false},     // padding, look forward
    {90, 90, 8, 3, 10, 2, 0, true, false},      // same-bucket restriction
    {90, 77, 8, 4, 10, 1, 0, false, true},      // duplicate correction
    {90, 90, 8, 4, 10, 1, 1, true, true},       // both
    {300, 300, 4, 2, 144, 1, 0, false, false},  // factorised buckets (144 = 12·12)
    {40, 0, 8, 2, 0, 1, 0, false, false},       // padding only
};

Config config_of(const Case& c) {
  Config cfg;
  cfg.chunk = c.chunk;
  cfg.rounds = c.rounds;
  cfg.buckets = c.buckets;
  cfg.look_back = c.back;
  cfg.look_forward = c.forward;
  cfg.same_bucket = c.same_bucket;
  cfg.dedup = c.dedup;
  return cfg;
}

}  // namespace

TEST_CASE("LSHAttention with one bucket and one chunk is exact shared-QK attention", "[lsh]") {
  for (const bool causal : {false, true})
    for (const Index n : {1, 7, 64, 100}) {
      CAPTURE(causal, n);
      const Head<double> h(n, 8, 5, 1);
      const MatD k = h.q;  // shared QK
      for (const Index rounds : {1, 3}) {
        LSHAttention<double> lsh({.chunk = 128, .rounds = rounds, .buckets = 1},
                                 HeadLayout{1, 8, 5, 3});
        const MatD expected = exact_shared_qk(h.q, k, h.v, n, causal);
        CHECK(reference::relative_error(run_head(lsh, h.q, h.q, h.v, n, causal), expected) < 1e-12);
        const LSHAttention<float> lsh_f({.chunk = 128, .rounds = rounds, .buckets = 1},
                                        HeadLayout{1, 8, 5, 3});
        const Matrix<float> qf = h.q.cast<float>(), vf = h.v.cast<float>();
        CHECK(reference::relative_error(run_head(lsh_f, qf, qf, vf, n, causal), expected) < 1e-5);
      }
    }
}

TEST_CASE("LSHAttention equals the naive multi-round reference with the same buckets", "[lsh]") {
  for (const bool causal : {false, true})
    for (const Case& c : cases) {
      CAPTURE(causal, c.n, c.length, c.chunk, c.rounds, c.buckets, c.back, c.forward, c.same_bucket,
              c.dedup);
      const Head<double> h(c.n, 6, 4, 2);
      const LSHAttention<double> lsh(config_of(c), HeadLayout{1, 6, 4, 5});
      for (const bool shared : {true, false}) {  // k = q (Reformer) or any k
        const Matrix<double>& k = shared ? h.q : h.k;
        const MatD expected = naive_lsh(lsh, h.q, k, h.v, 0, c.length, causal);
        CHECK(reference::relative_error(run_head(lsh, h.q, k, h.v, c.length, causal), expected) <
              1e-12);
      }
      // float: the same rotations give the same buckets for all but near-ties
      const LSHAttention<float> lsh_f(
          [&] {
            auto f = LSHAttention<float>::Config{};
            const Config d = config_of(c);
            f.chunk = d.chunk, f.rounds = d.rounds, f.buckets = d.buckets;
            f.look_back = d.look_back, f.look_forward = d.look_forward;
            f.same_bucket = d.same_bucket, f.dedup = d.dedup;
            return f;
          }(),
          HeadLayout{1, 6, 4, 5});
      const Matrix<float> qf = h.q.cast<float>(), vf = h.v.cast<float>();
      const MatD expected_f = naive_lsh(lsh_f, h.q, h.q, h.v, 0, c.length, causal);
      CHECK(reference::relative_error(run_head(lsh_f, qf, qf, vf, c.length, causal), expected_f) <
            1e-5);
    }
}

TEST_CASE("LSHAttention on clustered inputs: the error falls as rounds grow",
          "[lsh][approximation]") {
  // 16 well-separated directions, 512 tokens near them: softmax mass stays in a cluster,
  // and each round finds a random part of it; more rounds find more.
  const Index n = 512, d = 32, clusters = 16;
  std::vector<double> errors;
  for (const Index rounds : {1, 2, 4, 8}) {
    double error = 0;
    for (std::uint64_t seed = 1; seed <= 4; ++seed) {
      MatD centres(clusters, d);
      Matrix<double> x(n, d), v(n, d);
      CounterRng(seed, 10).fill_normal(centres);
      centres.rowwise().normalize();
      CounterRng(seed, 11).fill_normal(x, 0.1);
      CounterRng(seed, 12).fill_normal(v);
      for (Index t = 0; t < n; ++t)  // in-cluster logits ≈ 9, others ≈ ±2
        x.row(t) = 60.0 * (x.row(t) + centres.row(t % clusters));
      const MatD exact = exact_shared_qk(x, x, v, n, false);
      const LSHAttention<double> lsh({.chunk = 32, .rounds = rounds}, HeadLayout{1, d, d, seed});
      error += reference::relative_error(run_head(lsh, x, x, v, n, false), exact) / 4;
    }
    errors.push_back(error);
  }
  CAPTURE(errors);
  for (std::size_t i = 1; i < errors.size(); ++i)
    CHECK(errors[i] < errors[i - 1]);
  CHECK(errors.back() < 0.5 * errors.front());
}

TEST_CASE("LSHAttention: causal outputs ignore later tokens; padding influences nothing", "[lsh]") {
  const Index n = 200, d = 8;
  for (const bool dedup : {false, true}) {
    const LSHAttention<double> lsh({.chunk = 16, .rounds = 4, .dedup = dedup},
                                   HeadLayout{1, d, d, 9});
    Head<double> h(n, d, d, 4);
    const Matrix<double> before = run_head(lsh, h.q, h.q, h.v, n, true);
    const Index cut = 120;  // change every token after it: queries (= keys, hashes) and values
    Head<double> other(n, d, d, 5);
    h.q.bottomRows(n - cut - 1) = other.q.bottomRows(n - cut - 1);
    h.v.bottomRows(n - cut - 1) = other.v.bottomRows(n - cut - 1);
    const Matrix<double> after = run_head(lsh, h.q, h.q, h.v, n, true);
    // equal up to the summation order of products whose key count changed (masked keys
    // of the same chunk add exact zeros)
    CHECK(reference::relative_error(after.topRows(cut + 1), before.topRows(cut + 1)) < 1e-14);
    CHECK(after.bottomRows(n - cut - 1) != before.bottomRows(n - cut - 1));

    // padding: change the padded rows, bidirectional and causal; outputs of valid rows equal,
    // padded rows 0
    for (const bool causal : {false, true}) {
      const Index length = 150;
      const Matrix<double> padded = run_head(lsh, h.q, h.q, h.v, length, causal);
      Matrix<double> q2 = h.q, v2 = h.v;
      q2.bottomRows(n - length) *= -3.0;
      v2.bottomRows(n - length).setConstant(1e3);
      const Matrix<double> changed = run_head(lsh, q2, q2, v2, length, causal);
      CHECK(changed == padded);
      CHECK(padded.bottomRows(n - length).isZero(0));
    }
  }
}

TEST_CASE("LSHAttention gradients match finite differences (double), buckets held fixed",
          "[lsh][backward]") {
  for (const bool causal : {false, true})
    for (const Case& c :
         {Case{40, 40, 8, 2, 4, 1, 0, false, false}, Case{37, 30, 8, 3, 0, 1, 1, true, true}}) {
      CAPTURE(causal, c.n, c.length);
      const LSHAttention<double> lsh(config_of(c), HeadLayout{1, 4, 3, 8});
      Head<double> h(c.n, 4, 3, 6);
      for (const bool shared : {false, true}) {
        Matrix<double>& k = shared ? h.q : h.k;
        auto loss = [&] {
          return run_head(lsh, h.q, k, h.v, c.length, causal).cwiseProduct(h.g).sum();
        };
        // with k = q the numeric gradient of q is the sum of both paths
        const MatD num_q = reference::numeric_gradient(loss, h.q);
        const MatD num_k = shared ? MatD() : reference::numeric_gradient(loss, h.k);
        const MatD num_v = reference::numeric_gradient(loss, h.v);
        auto saved = lsh.make_saved(c.n, c.n);
        const Matrix<double> out = run_head(lsh, h.q, k, h.v, c.length, causal, &saved);
        Matrix<double> dq(c.n, 4), dk(c.n, 4), dv(c.n, 3);
        Workspace ws;
        ws.reserve(lsh.scratch_bytes(c.n, c.n, 4, 3));
        lsh.backward(h.q, k, h.v, out, h.g, saved, dq, dk, dv,
                     HeadContext{0, 0, 0, c.length, 0, causal}, ws);
        CHECK(ws.growths() == 0);
        if (shared) {
          CHECK(reference::gradient_error(dq + dk, num_q) < 1e-7);
        } else {
          CHECK(reference::gradient_error(dq, num_q) < 1e-7);
          CHECK(reference::gradient_error(dk, num_k) < 1e-7);
        }
        CHECK(reference::gradient_error(dv, num_v) < 1e-7);
      }
    }
}

TEST_CASE("MultiHeadAttention with LSHAttention is shared-QK and trains", "[lsh][mha]") {
  using Block = MultiHeadAttention<LSHAttention<double>, Causal>;
  static_assert(Block::shared_qk);
  static_assert(!MultiHeadAttention<FullAttention<double>>::shared_qk);
  Block block({.d_model = 8, .heads = 2, .seed = 3, .policy = {.chunk = 4, .rounds = 2}});
  std::vector<std::string> names;
  block.visit_parameters([&](std::string_view name, auto&, auto&) { names.emplace_back(name); });
  CHECK(names == std::vector<std::string>{"w_q", "w_v", "w_o", "b_q", "b_v", "b_o"});

  const SequenceShape shape{2, 13, {13, 9}};
  Matrix<double> x(26, 8), g(26, 8), y(26, 8);
  CounterRng(1).fill_normal(x);
  CounterRng(2).fill_normal(g);
  shape.zero_padding(g);  // padded rows are not part of the loss
  auto loss = [&] {
    block.forward(x, y, shape);
    return y.cwiseProduct(g).sum();
  };
  std::vector<MatD> numeric;
  block.visit_parameters([&](std::string_view, Matrix<double>& w, auto&) {
    numeric.push_back(reference::numeric_gradient(loss, w));
  });
  const MatD num_x = reference::numeric_gradient(loss, x);
  block.set_training(true);
  block.zero_grad();
  block.forward(x, y, shape);
  Matrix<double> dx(26, 8);
  block.backward(x, g, dx, shape);
  CHECK(reference::gradient_error(dx, num_x) < 1e-7);
  std::size_t i = 0;
  block.visit_parameters([&](std::string_view name, auto&, Matrix<double>& grad) {
    CAPTURE(name);
    CHECK(reference::gradient_error(grad, numeric[i++]) < 1e-7);
  });
}

TEST_CASE("With rotary positions LSHAttention hashes and attends the rotated query-keys",
          "[lsh][rotary]") {
  // The shared query-keys are rotated before the policy sees them, so the buckets are drawn on
  // the vectors whose dot products are the logits (RoPE's, relative in position): the block
  // equals its policy run on Q rotated by hand, and its gradients the finite differences.
  using Block = MultiHeadAttention<LSHAttention<double>, Causal>;
  const LSHAttention<double>::Config config{.chunk = 4, .rounds = 2};
  Block block({.d_model = 8, .heads = 2, .seed = 3, .policy = config, .rotary = {true, 100.0}});
  std::map<std::string, Matrix<double>> w;
  block.visit_parameters([&](std::string_view name, Matrix<double>& value, auto&) {
    CounterRng(9, w.size()).fill_normal(value);  // biases too
    w[std::string(name)] = value;
  });
  const SequenceShape shape{2, 13, {13, 9}};
  Matrix<double> x(26, 8), y(26, 8);
  CounterRng(1).fill_normal(x);
  block.forward(x, y, shape);
  MatD q = (x * w["w_q"]).rowwise() + w["b_q"].row(0);
  MatD v = (x * w["w_v"]).rowwise() + w["b_v"].row(0);
  reference::rotate_positions(q, 2, 4, 13, 100.0, 4);
  shape.zero_padding(q);
  shape.zero_padding(v);
  AttentionCore<LSHAttention<double>, Causal> core(config, HeadLayout{2, 4, 4, 3});
  Matrix<double> merged(26, 8);
  core.forward(q, q, v, merged, shape, shape, false);
  MatD expected = (merged * w["w_o"]).rowwise() + w["b_o"].row(0);
  MatD got = y;
  shape.zero_padding(expected);
  shape.zero_padding(got);
  CHECK(reference::relative_error(got, expected) < 1e-13);

  layer_testing::check_gradients(block, x, shape);
}

TEST_CASE("LSHAttention rotations are seeded, readable and settable", "[lsh]") {
  const HeadLayout layout{2, 6, 6, 1};
  const LSHAttention<double> a({.chunk = 8, .rounds = 2}, layout);
  LSHAttention<double> b({.chunk = 8, .rounds = 2}, HeadLayout{2, 6, 6, 2});
  CHECK(a.rotation(1, 1, 5) != b.rotation(1, 1, 5));
  // column j does not depend on how many are drawn
  CHECK(a.rotation(0, 1, 9).leftCols(5) == a.rotation(0, 1, 5));
  const Head<double> h(50, 6, 6, 3);
  const Index columns = a.plan(50).columns();
  for (Index head = 0; head < 2; ++head)
    for (Index round = 0; round < 2; ++round)
      b.set_rotation(head, round, a.rotation(head, round, columns));
  CHECK(run_head(a, h.q, h.q, h.v, 50, false) == run_head(b, h.q, h.q, h.v, 50, false));
  CHECK(b.rotation(1, 0, columns) == a.rotation(1, 0, columns));
  // a fixed rotation too narrow for a longer sequence is an error before any work
  CHECK_THROWS_WITH(b.validate(400, 400, 6, 6, false),
                    Catch::Contains("fixed at") && Catch::Contains("columns"));
  b.redraw(2);
  CHECK_NOTHROW(b.validate(400, 400, 6, 6, false));
}

TEST_CASE("LSHAttention: bad configuration gives effattn::Error", "[lsh][errors]") {
  const HeadLayout layout{1, 4, 4, 0};
  using L = LSHAttention<float>;
  CHECK_THROWS_WITH(L({.buckets = 7}, layout), Catch::Contains("LSHAttention") &&
                                                   Catch::Contains("buckets") &&
                                                   Catch::Contains("7") && Catch::Contains("even"));
  CHECK_THROWS_WITH(L({.chunk = 0}, layout), Catch::Contains("chunk") && Catch::Contains("0"));
  CHECK_THROWS_WITH(L({.rounds = 0}, layout), Catch::Contains("rounds"));
  CHECK_THROWS_WITH(L({.look_back = -1}, layout), Catch::Contains("look_back"));
  CHECK_THROWS_WITH(L({.scale = -1.0}, layout), Catch::Contains("scale"));
  CHECK_NOTHROW(L({.buckets = L::max_buckets}, layout));
  CHECK_THROWS_WITH(L({.buckets = L::max_buckets + 2}, layout),
                    Catch::Contains("'buckets'") && Catch::Contains("at most 4194304"));
  CHECK_THROWS_WITH(L({.buckets = Index(1) << 40}, layout), Catch::Contains("'buckets'"));
  const L lsh({}, layout);
  CHECK_THROWS_WITH(lsh.validate(10, 12, 4, 4, false),
                    Catch::Contains("n_k") && Catch::Contains("self-attention"));
  CHECK_THROWS_WITH(lsh.validate(10, 10, 5, 4, false), Catch::Contains("d_k"));
  CHECK_THROWS_WITH(lsh.rotation(1, 0, 2), Catch::Contains("head"));
  CHECK_THROWS_WITH(lsh.rotation(0, 4, 2), Catch::Contains("round"));
}

TEST_CASE("LSHAttention: rotations drawn when a call is planned equal those drawn up front",
          "[lsh][rotation]") {
  // validate() (run by AttentionCore before its parallel region) draws the columns a call
  // needs, in steps as longer calls come; the numbers must not depend on when they were
  // drawn. (That the kernels then draw nothing is checked by test_no_allocation.cpp, which
  // plans with validate() and runs forward and backward with Eigen's allocator disabled.)
  const Index d = 6;
  LSHAttention<double> lazy({.chunk = 4, .rounds = 2}, HeadLayout{1, d, d, 9}),
      eager({.chunk = 4, .rounds = 2}, HeadLayout{1, d, d, 9});
  const Index wide = eager.plan(400).columns();
  (void)eager.rotation(0, 0, wide);
  (void)eager.rotation(0, 1, wide);
  lazy.validate(40, 40, d, d, false);
  lazy.validate(400, 400, d, d, false);  // more buckets: more columns, drawn here
  CHECK(lazy.rotation(0, 1, wide) == eager.rotation(0, 1, wide));
}

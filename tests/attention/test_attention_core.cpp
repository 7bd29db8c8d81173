// AttentionCore: scheduling of (sequence, head) problems, query splits, saved state, errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "effattn/attention/attention_core.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/core/counter_rng.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

// The keys a row of Masking sees, restated for the reference (attention/masking.hpp).
template <class Masking>
reference::Mask mask_of(const Masking& masking, Index key_length, Index shift) {
  reference::Mask mask{Masking::causal, key_length, shift};
  if constexpr (Masking::windowed) {
    const Index w = masking.size;
    mask.before = Masking::causal ? w - 1 : w / 2;
    mask.after = Masking::causal ? 0 : w - 1 - w / 2;
  }
  return mask;
}

// Most windows below have their size at run time (CausalWindow<>{37}): one instantiation of the
// kernels serves every size, as in a user's program that reads it from a configuration.
template <class S = double, class Masking>
void check_against_reference(Masking masking, const SequenceShape& shape, Index heads, Index d,
                             typename FullAttention<S>::Config config = {}) {
  AttentionCore<FullAttention<S>, Masking> core(config, HeadLayout{heads, d, d, 0}, masking);
  const Index t = shape.tokens();
  Matrix<S> q(t, heads * d), k(t, heads * d), v(t, heads * d), out(t, heads * d);
  CounterRng(1).fill_normal(q);
  CounterRng(2).fill_normal(k);
  CounterRng(3).fill_normal(v);
  core.forward(q, k, v, out, shape, shape, true);
  CHECK(core.has_saved());
  CHECK(core.scratch_growths() == 0);

  Matrix<S> d_out(t, heads * d), dq(t, heads * d), dk(t, heads * d), dv(t, heads * d);
  CounterRng(4).fill_normal(d_out);
  core.backward(q, k, v, out, d_out, dq, dk, dv, shape, shape);
  CHECK(core.scratch_growths() == 0);  // forward and backward ran in the scratch they planned

  const double scale = 1.0 / std::sqrt(double(d));
  const double tol = std::is_same_v<S, float> ? 2e-5 : 1e-12;
  for (Index b = 0; b < shape.batch; ++b)
    for (Index h = 0; h < heads; ++h) {
      CAPTURE(b, h);
      const reference::Mask mask = mask_of(masking, shape.valid_length(b), 0);
      reference::Scores scores{0, config.softcap};
      if (config.alibi.enabled)
        scores.slope =
            config.alibi.slopes.empty() ? Alibi::default_slopes(heads)[h] : config.alibi.slopes[h];
      auto blk = [&](const Matrix<S>& m) -> MatD {
        return m.block(b * shape.seq, h * d, shape.seq, d).template cast<double>();
      };
      CHECK(reference::relative_error(
                blk(out), reference::attention(blk(q), blk(k), blk(v), scale, mask, scores)) < tol);
      const auto g =
          reference::attention_backward(blk(q), blk(k), blk(v), blk(d_out), scale, mask, scores);
      CHECK(reference::gradient_error(blk(dq), g.dq) < tol);
      CHECK(reference::gradient_error(blk(dk), g.dk) < tol);
      CHECK(reference::gradient_error(blk(dv), g.dv) < tol);
    }
}

}  // namespace

TEST_CASE("AttentionCore splits a lone head's queries and still matches the reference",
          "[core_attention]") {
  // One problem and 300 queries: with two or more threads the head is split into slices,
  // each writing its rows of the output and of the saved log-sum-exp.
  check_against_reference(Bidirectional{}, {1, 300, {}}, 1, 8);
  check_against_reference(Causal{}, {1, 300, {}}, 1, 8);
  check_against_reference(Causal{}, {2, 130, {130, 77}}, 1, 4);
  // Many problems: one task per (sequence, head).
  check_against_reference(Causal{}, {3, 40, {40, 1, 0}}, 3, 4);
}

TEMPLATE_TEST_CASE("Windowed full attention equals the reference, forward and backward",
                   "[core_attention][window]", float, double) {
  using S = TestType;
  // Small tiles, so that windows start and end inside tiles, cover whole ones and skip others;
  // padding cuts windows short; a window wider than the sequence is plain (causal) attention.
  const typename FullAttention<S>::Config tiles{.query_tile = 24, .key_tile = 32};
  for (const SequenceShape& shape :
       {SequenceShape{1, 300, {}}, SequenceShape{3, 130, {130, 77, 5}}}) {
    CAPTURE(shape.batch);
    check_against_reference<S>(CausalWindow<>{37}, shape, 2, 8, tiles);
    check_against_reference<S>(SlidingWindow<>{64}, shape, 2, 8, tiles);
    check_against_reference<S>(SlidingWindow<>{1}, shape, 1, 8, tiles);
    check_against_reference<S>(CausalWindow<>{1000}, shape, 1, 8, tiles);
    check_against_reference<S>(CausalWindow<100>{}, shape, 2,
                               16);  // the default tiles; size in the type
    check_against_reference<S>(SlidingWindow<>{51}, shape, 2, 16);
  }
}

TEST_CASE("A window sized at run time needs at least one key", "[core_attention][window]") {
  using Core = AttentionCore<FullAttention<float>, SlidingWindow<>>;
  CHECK_THROWS_WITH((Core({}, HeadLayout{1, 8, 8, 0}, SlidingWindow<>{0})),
                    Catch::Contains("AttentionCore") && Catch::Contains("masking.size") &&
                        Catch::Contains("a window of 0 keys"));
  CHECK_THROWS_WITH((Core({}, HeadLayout{1, 8, 8, 0})), Catch::Contains("at least 1 key"));
  CHECK(Core({}, HeadLayout{1, 8, 8, 0}, SlidingWindow<>{5}).masking().size == 5);
}

TEST_CASE("AttentionCore rejects mismatched inputs", "[core_attention][errors]") {
  AttentionCore<FullAttention<float>> core({}, HeadLayout{2, 4, 3, 0});
  Matrix<float> q(10, 8), k(10, 8), v(10, 6), out(10, 6), bad(10, 7);
  q.setOnes();
  k.setOnes();
  v.setOnes();
  CHECK_NOTHROW(core.forward(q, k, v, out, {2, 5}, {2, 5}, false));
  CHECK_THROWS_WITH(
      core.forward(bad, k, v, out, {2, 5}, {2, 5}, false),
      Catch::Contains("AttentionCore") && Catch::Contains("'q'") && Catch::Contains("10×8"));
  CHECK_THROWS_WITH(core.forward(q, k, bad, out, {2, 5}, {2, 5}, false), Catch::Contains("'v'"));
  CHECK_THROWS_WITH(core.forward(q, k, v, bad, {2, 5}, {2, 5}, false), Catch::Contains("'out'"));
  CHECK_THROWS_WITH(core.forward(q, k, v, out, {2, 5}, {1, 10}, false),
                    Catch::Contains("kv_shape.batch"));
  Matrix<float> dq(10, 8), dk(10, 8), dv(10, 6);
  CHECK_THROWS_WITH(core.backward(q, k, v, out, out, dq, dk, dv, {2, 5}, {2, 5}),
                    Catch::Contains("without a forward that kept its state"));
  core.forward(q, k, v, out, {2, 5}, {2, 5}, true);
  CHECK_THROWS_WITH(
      core.backward(q, k, v, out, out, dq, dk, dv, {1, 10}, {1, 10}),
      Catch::Contains("'q_shape.batch'") && Catch::Contains("the forward's batch, 2"));
  CHECK_NOTHROW(core.backward(q, k, v, out, out, dq, dk, dv, {2, 5}, {2, 5}));
  core.release_saved();
  CHECK_FALSE(core.has_saved());
}

TEMPLATE_TEST_CASE("ALiBi and soft-capping equal the reference, forward and backward",
                   "[core_attention][scores]", float, double) {
  using S = TestType;
  using Config = typename FullAttention<S>::Config;
  // A cap of 1.5 bends most logits (d = 8: scaled logits of spread about 1); slopes of the
  // paper (two heads: 1/16, 1/256) and steep ones; small tiles and the defaults.
  const Config alibi{.alibi = {.enabled = true}};
  const Config steep{.query_tile = 24, .key_tile = 32, .alibi = {true, {0.5, 0.25}}};
  const Config capped{.query_tile = 24, .key_tile = 32, .softcap = 1.5};
  const Config both{.alibi = {true, {0.3, 0.05}}, .softcap = 1.5};
  for (const SequenceShape& shape :
       {SequenceShape{1, 300, {}}, SequenceShape{3, 130, {130, 77, 5}}}) {
    CAPTURE(shape.batch);
    for (const Config& config : {alibi, steep, capped, both}) {
      CAPTURE(config.softcap, config.alibi.enabled);
      check_against_reference<S>(Bidirectional{}, shape, 2, 8, config);
      check_against_reference<S>(Causal{}, shape, 2, 8, config);
      check_against_reference<S>(CausalWindow<>{37}, shape, 2, 8, config);
      check_against_reference<S>(SlidingWindow<>{64}, shape, 2, 8, config);
    }
  }
}

TEST_CASE("ALiBi's default slopes are the paper's, and bad modifiers are refused", "[scores]") {
  const auto eight = Alibi::default_slopes(8);
  REQUIRE(eight.size() == 8);
  for (std::size_t k = 0; k < 8; ++k)
    CHECK(eight[k] == std::pow(2.0, -double(k + 1)));
  // Not a power of two: 4's slopes, then every other one of 8's.
  const auto six = Alibi::default_slopes(6);
  REQUIRE(six.size() == 6);
  CHECK(six[3] == std::pow(2.0, -8.0));
  CHECK(six[4] == std::pow(2.0, -1.0));
  CHECK(six[5] == std::pow(2.0, -3.0));
  CHECK_THROWS_AS(FullAttention<float>({.softcap = -1}, HeadLayout{2, 8, 8, 0}), Error);
  CHECK_THROWS_AS(FullAttention<float>({.alibi = {true, {0.5}}}, HeadLayout{2, 8, 8, 0}), Error);
  CHECK_THROWS_AS(FullAttention<float>({.alibi = {true, {0.5, -1.0}}}, HeadLayout{2, 8, 8, 0}),
                  Error);
}

namespace {

// Decodes n tokens, the first `first` in one call and the rest one at a time, with a block of
// CausalWindow<>{w}, and checks them against its forward; returns the largest cache it held.
template <class S>
Index check_windowed_decoding(Index w, Index n, Index first, Index heads, Index expected_tasks,
                              typename FullAttention<S>::Config config = {}) {
  const Index d = 8;
  AttentionCore<FullAttention<S>, CausalWindow<>> core(config, HeadLayout{heads, d, d, 0},
                                                       CausalWindow<>{w});
  Matrix<S> q(n, heads * d), k(n, heads * d), v(n, heads * d), out(n, heads * d);
  CounterRng(1).fill_normal(q);
  CounterRng(2).fill_normal(k);
  CounterRng(3).fill_normal(v);
  core.forward(q, k, v, out, SequenceShape{1, n, {}}, SequenceShape{1, n, {}}, false);
  auto decoder = core.start_decoding(1);
  Matrix<S> decoded(n, heads * d);
  core.decode(q.topRows(first), k.topRows(first), v.topRows(first), decoded.topRows(first),
              decoder);
  Index largest = 0;
  for (Index t = first; t < n; ++t) {
    Matrix<S> step(1, heads * d);
    core.decode(q.middleRows(t, 1), k.middleRows(t, 1), v.middleRows(t, 1), step, decoder);
    decoded.row(t) = step;
    largest = std::max(largest, decoder.states[0].k.rows());
  }
  CHECK(core.last_tasks() == expected_tasks);
  const double tol = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  CHECK(reference::relative_error(decoded.template cast<double>(), out.template cast<double>()) <
        tol);
  // ... and the reference's window: the last 10 rows (at positions n − 10 …) see their W keys.
  const MatD expected = reference::attention(
      q.block(n - 10, 0, 10, d).template cast<double>(),
      k.block(0, 0, n, d).template cast<double>(), v.block(0, 0, n, d).template cast<double>(),
      1.0 / std::sqrt(double(d)), mask_of(CausalWindow<>{w}, n, n - 10),
      reference::Scores{config.alibi.enabled ? config.alibi.slopes[0] : 0.0, config.softcap});
  CHECK(reference::relative_error(decoded.block(n - 10, 0, 10, d).template cast<double>(),
                                  expected) < tol);
  return largest;
}

}  // namespace

TEMPLATE_TEST_CASE("A causal window decodes token by token as its forward computes",
                   "[core_attention][window][decode]", float, double) {
  using S = TestType;
  // One token at a time: the cache keeps the window's keys, not the sequence's 600.
  CHECK(check_windowed_decoding<S>(37, 600, 1, 2, 2) <= 2 * (37 + 1));
  // 2190 tokens in one call (the forward's kernel), then one at a time: the cache drops the
  // keys before the window and keeps 2100, two decode blocks of 2048 keys.
  check_windowed_decoding<S>(2100, 2200, 2190, 2, 2 * 2);
  // With ALiBi and a soft cap, in the forward's kernel and in the cache blocks.
  check_windowed_decoding<S>(2100, 2200, 2190, 2, 2 * 2,
                             {.alibi = {true, {0.01, 0.02}}, .softcap = 1.5});
}

TEMPLATE_TEST_CASE("Grouped key/value heads decode as their forward, one cache per key/value head",
                   "[core_attention][decode][gqa]", float, double) {
  using S = TestType;
  // 2190 tokens in one call (the forward's kernel), then one at a time against a cache of two
  // blocks, each read once for the group's two query heads; ALiBi gives each query head of a
  // group its own slope over the one cache.
  const Index heads = 4, kv = 2, d = 8, n = 2200, first = 2190;
  const typename FullAttention<S>::Config config{.alibi = {true, {}}};
  AttentionCore<FullAttention<S>, Causal> core(config, HeadLayout{heads, d, d, 0, kv});
  Matrix<S> q(n, heads * d), k(n, kv * d), v(n, kv * d), out(n, heads * d);
  CounterRng(1).fill_normal(q);
  CounterRng(2).fill_normal(k);
  CounterRng(3).fill_normal(v);
  core.forward(q, k, v, out, SequenceShape{1, n, {}}, SequenceShape{1, n, {}}, false);
  auto decoder = core.start_decoding(1);
  CHECK(decoder.states.size() == std::size_t(kv));  // the cache: kv / heads of the bytes
  Matrix<S> decoded(n, heads * d);
  core.decode(q.topRows(first), k.topRows(first), v.topRows(first), decoded.topRows(first),
              decoder);
  for (Index t = first; t < n; ++t) {
    Matrix<S> step(1, heads * d);
    core.decode(q.middleRows(t, 1), k.middleRows(t, 1), v.middleRows(t, 1), step, decoder);
    decoded.row(t) = step;
  }
  CHECK(core.last_tasks() == kv * 2);  // (key/value head, cache block) tasks
  CHECK(core.scratch_growths() == 0);
  const double tol = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  CHECK(reference::relative_error(decoded.template cast<double>(), out.template cast<double>()) <
        tol);
  // ... and the reference, for the last rows of query head 3 (key/value head 1).
  const MatD expected = reference::attention(
      q.block(n - 10, 3 * d, 10, d).template cast<double>(),
      k.block(0, d, n, d).template cast<double>(), v.block(0, d, n, d).template cast<double>(),
      1.0 / std::sqrt(double(d)), reference::Mask{true, n, n - 10},
      reference::Scores{Alibi::default_slopes(heads)[3], 0});
  CHECK(reference::relative_error(decoded.block(n - 10, 3 * d, 10, d).template cast<double>(),
                                  expected) < tol);
}

// Every policy gives the same bits at 1, 2, 3 and 7 threads: forward and backward, with
// padding, both maskings and block counts that do not divide the sequence.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "effattn/effattn.hpp"
#include "reference.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace effattn;

namespace {

template <class S>
struct Result {
  Matrix<S> out, dq, dk, dv;
  Index forward_tasks = 0, backward_tasks = 0;
};

// One head is the case the threads must share: 1 sequence × 1 head, and 2 sequences × 2 heads
// of which one is padded.
template <class Core, class S = typename Core::Scalar>
Result<S> run(Core& core, const SequenceShape& shape, Index d, int threads) {
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
  const Index rows = shape.tokens(), width = core.layout().heads * d;
  Matrix<S> q(rows, width), k(rows, width), v(rows, width), d_out(rows, width);
  CounterRng(11).fill_normal(q);
  CounterRng(12).fill_normal(k);
  CounterRng(13).fill_normal(v);
  CounterRng(14).fill_normal(d_out);
  Result<S> r{Matrix<S>(rows, width), Matrix<S>(rows, width), Matrix<S>(rows, width),
              Matrix<S>(rows, width)};
  core.forward(q, k, v, r.out, shape, shape, true);
  r.forward_tasks = core.last_tasks();
  core.backward(q, k, v, r.out, d_out, r.dq, r.dk, r.dv, shape, shape);
  r.backward_tasks = core.last_tasks();
#ifdef _OPENMP
  omp_set_num_threads(saved);
#endif
  return r;
}

// A lone head of n tokens makes `forward` and `backward` tasks at 2 threads, and one task (its
// blocks in order) at 1 thread.
template <class Core>
void check_split(Core& core, Index n, Index d, Index forward, Index backward) {
  const auto two = run(core, SequenceShape{1, n}, d, 2);
  CHECK(two.forward_tasks == forward);
  CHECK(two.backward_tasks == backward);
  const auto one = run(core, SequenceShape{1, n}, d, 1);
  CHECK(one.forward_tasks == 1);
  CHECK(one.backward_tasks == 1);
}

// Bitwise equality, without printing the matrices when it fails.
template <class S>
bool same_bits(const Matrix<S>& a, const Matrix<S>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
}

template <class Policy, class Masking>
void same_bits_at_every_thread_count(typename Policy::Config config, Index d,
                                     Masking masking = {}) {
  // One head alone (all threads on it), padded or not, and four heads of which one is padded.
  for (const auto& shape :
       {SequenceShape{1, 900}, SequenceShape{1, 900, {613}}, SequenceShape{2, 900, {900, 701}}}) {
    const Index heads = shape.batch;
    AttentionCore<Policy, Masking> core(config, HeadLayout{heads, d, d, 7}, masking);
    const auto one = run(core, shape, d, 1);
    REQUIRE(one.out.allFinite());
    REQUIRE(one.dq.allFinite());
    REQUIRE(!one.dq.isZero());
    for (const int threads : {2, 3, 7}) {
      CAPTURE(Policy::name, Masking::causal, shape.batch, threads);
      const auto many = run(core, shape, d, threads);
      CHECK(same_bits(many.out, one.out));
      CHECK(same_bits(many.dq, one.dq));
      CHECK(same_bits(many.dk, one.dk));
      CHECK(same_bits(many.dv, one.dv));
    }
  }
}

// Grouped key/value heads (GQA, MQA): the block equals one in which every query head has its
// own copy of its key/value head, bit for bit, and its key and value gradients are the sums of
// the copies' over each group, in head order; at 1 and 3 threads.
template <class Policy, class Masking>
void check_grouped_heads(typename Policy::Config config, Index kv_heads) {
  using S = typename Policy::Scalar;
  const Index heads = 4, d = 16, group = heads / kv_heads;
  const SequenceShape shape{2, 300, {300, 211}};
  const Index rows = shape.tokens();
  Matrix<S> q(rows, heads * d), k(rows, kv_heads * d), v(rows, kv_heads * d);
  Matrix<S> d_out(rows, heads * d), k_copies(rows, heads * d), v_copies(rows, heads * d);
  CounterRng(21).fill_normal(q);
  CounterRng(22).fill_normal(k);
  CounterRng(23).fill_normal(v);
  CounterRng(24).fill_normal(d_out);
  for (Index h = 0; h < heads; ++h) {
    k_copies.middleCols(h * d, d) = k.middleCols(h / group * d, d);
    v_copies.middleCols(h * d, d) = v.middleCols(h / group * d, d);
  }
  AttentionCore<Policy, Masking> copies(config, HeadLayout{heads, d, d, 7});
  Matrix<S> out_c(rows, heads * d), dq_c(rows, heads * d), dk_c(rows, heads * d),
      dv_c(rows, heads * d);
  copies.forward(q, k_copies, v_copies, out_c, shape, shape, true);
  copies.backward(q, k_copies, v_copies, out_c, d_out, dq_c, dk_c, dv_c, shape, shape);
  Matrix<S> dk_sum(rows, kv_heads * d), dv_sum(rows, kv_heads * d);
  for (Index g = 0; g < kv_heads; ++g) {
    dk_sum.middleCols(g * d, d) = dk_c.middleCols(g * group * d, d);
    dv_sum.middleCols(g * d, d) = dv_c.middleCols(g * group * d, d);
    for (Index j = 1; j < group; ++j) {
      dk_sum.middleCols(g * d, d) += dk_c.middleCols((g * group + j) * d, d);
      dv_sum.middleCols(g * d, d) += dv_c.middleCols((g * group + j) * d, d);
    }
  }
  AttentionCore<Policy, Masking> grouped(config, HeadLayout{heads, d, d, 7, kv_heads});
  for (const int threads : {1, 3}) {
    CAPTURE(Policy::name, Masking::causal, kv_heads, threads);
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
#endif
    Matrix<S> out(rows, heads * d), dq(rows, heads * d), dk(rows, kv_heads * d),
        dv(rows, kv_heads * d);
    grouped.forward(q, k, v, out, shape, shape, true);
    grouped.backward(q, k, v, out, d_out, dq, dk, dv, shape, shape);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    CHECK(same_bits(out, out_c));
    CHECK(same_bits(dq, dq_c));
    CHECK(same_bits(dk, dk_sum));
    CHECK(same_bits(dv, dv_sum));
    CHECK(grouped.scratch_growths() == 0);
  }
}

}  // namespace

TEST_CASE("Grouped key/value heads equal their copies per query head, at 1 and 3 threads",
          "[threads][determinism][gqa]") {
  for (const Index kv_heads : {2, 1}) {  // GQA, MQA
    check_grouped_heads<FullAttention<float>, Causal>({}, kv_heads);
    check_grouped_heads<FullAttention<double>, Bidirectional>({}, kv_heads);
    check_grouped_heads<Favor<float>, Causal>({.features = 32, .chunk = 16}, kv_heads);
    check_grouped_heads<LowRank<float>, Bidirectional>({.projection = {.k = 200, .n_max = 900}},
                                                       kv_heads);
  }
  // Not a divisor of the heads, and a shared-QK policy (its keys are its queries): Errors.
  CHECK_THROWS_WITH((AttentionCore<FullAttention<float>>({}, HeadLayout{4, 8, 8, 0, 3})),
                    Catch::Contains("layout.kv_heads") && Catch::Contains("a divisor of heads"));
  CHECK_THROWS_WITH((AttentionCore<LSHAttention<float>>({}, HeadLayout{4, 8, 8, 0, 2})),
                    Catch::Contains("shares QK"));
}

TEMPLATE_TEST_CASE("Every policy gives the same bits at 1, 2, 3 and 7 threads",
                   "[threads][determinism]", Bidirectional, Causal) {
  using Masking = TestType;
  same_bits_at_every_thread_count<FullAttention<float>, Masking>({}, 16);
  same_bits_at_every_thread_count<FullAttention<double>, Masking>({}, 16);
  // Causal Favor in chunks of 16: 8 blocks of 128 rows, the last of 4.
  same_bits_at_every_thread_count<Favor<float>, Masking>({.features = 32, .chunk = 16}, 16);
  same_bits_at_every_thread_count<LSHAttention<float>, Masking>({.chunk = 32, .rounds = 2}, 16);
  // Windows both ways (a chunk's gradients reach the rows of the chunks on either side), keys
  // met in several rounds counted once, only the own bucket.
  same_bits_at_every_thread_count<LSHAttention<float>, Masking>(
      {.chunk = 24, .rounds = 3, .buckets = 8, .look_forward = 1, .dedup = true}, 16);
  same_bits_at_every_thread_count<LSHAttention<double>, Masking>(
      {.chunk = 40, .rounds = 2, .same_bucket = true}, 16);
  if constexpr (!Masking::causal)
    // 200 projected rows: two blocks of E k and two of F v, then the query blocks.
    same_bits_at_every_thread_count<LowRank<float>, Masking>(
        {.projection = {.k = 200, .n_max = 900}}, 16);
}

TEST_CASE("Windowed full attention gives the same bits at 1, 2, 3 and 7 threads",
          "[threads][determinism][window]") {
  // Sizes at run time (one instantiation for all), as users who read them from a config have.
  same_bits_at_every_thread_count<FullAttention<float>>({}, 16, CausalWindow<>{100});
  same_bits_at_every_thread_count<FullAttention<float>>({}, 16, SlidingWindow<>{257});
  same_bits_at_every_thread_count<FullAttention<double>>({}, 16, CausalWindow<>{300});
}

TEST_CASE("A lone head's backward is split into key blocks that all threads share", "[threads]") {
  // 900 keys in tiles of 384: three blocks, the last short; causal pairs an early tile with a
  // late one, two blocks.
  AttentionCore<FullAttention<float>> core({}, HeadLayout{1, 16, 16, 0});
  const auto r = run(core, SequenceShape{1, 900}, 16, 2);
  CHECK(r.backward_tasks == 3);
  CHECK(r.forward_tasks >= 2);
  AttentionCore<FullAttention<float>, Causal> causal({}, HeadLayout{1, 16, 16, 0});
  CHECK(run(causal, SequenceShape{1, 900}, 16, 2).backward_tasks == 2);
}

TEST_CASE("A lone head's causal Favor runs as blocks when threads are to spare", "[threads]") {
  // 900 rows in blocks of 8 chunks of 16: 8 blocks (7 of 128 rows, one of 4). Two threads: the
  // first block's queries, the key sums of blocks 1 … 6, then the query blocks 1 … 7 (14
  // tasks); backward also the key blocks (22). One thread: one task, the blocks in order.
  AttentionCore<Favor<float>, Causal> core({.features = 16, .chunk = 16}, HeadLayout{1, 8, 8, 0});
  CHECK(core.policy().causal_blocks(900) == 8);
  check_split(core, 900, 8, 14, 22);
  // Long sequences: 32 blocks of whole chunks; short ones: blocks of 8 chunks.
  CHECK(core.policy().causal_blocks(100000) == 32);
  CHECK(core.policy().causal_block_rows(100000) % 16 == 0);
  CHECK(core.policy().causal_blocks(300) == 3);
}

TEST_CASE("Split backward equals the double-precision reference", "[threads][full]") {
  // Key blocks that padding ends inside, or wholly covers, and a causal diagonal that crosses
  // block boundaries: every gradient against the naive reference.
  for (const bool causal : {false, true}) {
    const SequenceShape shape{2, 800, {800, 390}};
    const Index d = 8, heads = 1;
    Matrix<float> q(shape.tokens(), d), k = q, v = q, d_out = q;
    CounterRng(1).fill_normal(q);
    CounterRng(2).fill_normal(k);
    CounterRng(3).fill_normal(v);
    CounterRng(4).fill_normal(d_out);
    Matrix<float> out = q, dq = q, dk = q, dv = q;
    for (const int threads : {1, 3}) {
#ifdef _OPENMP
      const int saved = omp_get_max_threads();
      omp_set_num_threads(threads);
#endif
      if (causal) {
        AttentionCore<FullAttention<float>, Causal> core({}, HeadLayout{heads, d, d, 0});
        core.forward(q, k, v, out, shape, shape, true);
        core.backward(q, k, v, out, d_out, dq, dk, dv, shape, shape);
      } else {
        AttentionCore<FullAttention<float>> core({}, HeadLayout{heads, d, d, 0});
        core.forward(q, k, v, out, shape, shape, true);
        core.backward(q, k, v, out, d_out, dq, dk, dv, shape, shape);
      }
#ifdef _OPENMP
      omp_set_num_threads(saved);
#endif
      for (Index b = 0; b < shape.batch; ++b) {
        CAPTURE(causal, threads, b);
        const Index n = shape.seq, valid = shape.valid_length(b);
        const auto rows = [&](const Matrix<float>& m) {
          return reference::MatD(m.middleRows(b * n, n).cast<double>());
        };
        const auto grads = reference::attention_backward(
            rows(q), rows(k), rows(v), rows(d_out), 1.0 / std::sqrt(double(d)),
            reference::Mask{.causal = causal, .key_length = valid});
        // Valid rows against the reference; padded keys get no gradient.
        CHECK(reference::relative_error(rows(dq).topRows(valid), grads.dq.topRows(valid)) < 1e-4);
        CHECK(reference::relative_error(rows(dk).topRows(valid), grads.dk.topRows(valid)) < 1e-4);
        CHECK(reference::relative_error(rows(dv).topRows(valid), grads.dv.topRows(valid)) < 1e-4);
        CHECK(rows(dk).bottomRows(n - valid).isZero());
        CHECK(rows(dv).bottomRows(n - valid).isZero());
      }
    }
  }
}

TEST_CASE("Decoding splits a long cache into blocks: the same bits at every thread count",
          "[threads][decoding]") {
  // 2 sequences × 2 heads; 4500 tokens prefilled (one block: many queries), then 1 and 3 new
  // tokens against 4501 and 4504 keys: three blocks of 2048 keys each, merged in block order.
  const Index batch = 2, heads = 2, d = 16, width = heads * d, prefix = 4500;
  const Index steps[] = {prefix, 1, 3};
  const Index total = prefix + 4;
  Matrix<float> q(batch * total, width), k = q, v = q;
  CounterRng(1).fill_normal(q);
  CounterRng(2).fill_normal(k);
  CounterRng(3).fill_normal(v);
  // The rows of step s (tokens [t0, t0 + m) of every sequence), sequence b at rows b·m.
  const auto rows_of = [&](const Matrix<float>& x, Index t0, Index m) {
    Matrix<float> r(batch * m, width);
    for (Index b = 0; b < batch; ++b)
      r.middleRows(b * m, m) = x.middleRows(b * total + t0, m);
    return r;
  };
  AttentionCore<FullAttention<float>, Causal> core({}, HeadLayout{heads, d, d, 0});
  CHECK(core.policy().decode_blocks(3, prefix + 4) == 3);
  std::vector<Matrix<float>> first;
  for (const int threads : {1, 2, 3, 7}) {
    CAPTURE(threads);
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
#endif
    auto decoder = core.start_decoding(batch);
    std::vector<Matrix<float>> outs;
    Index t0 = 0;
    for (const Index m : steps) {
      Matrix<float> out(batch * m, width);
      core.decode(rows_of(q, t0, m), rows_of(k, t0, m), rows_of(v, t0, m), out, decoder);
      outs.push_back(out);
      t0 += m;
    }
    CHECK(core.last_tasks() == batch * heads * 3);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    if (first.empty()) {
      first = outs;
      continue;
    }
    for (std::size_t s = 0; s < outs.size(); ++s)
      CHECK(same_bits(outs[s], first[s]));
  }
  // And the values of the causal forward over the whole sequences.
  Matrix<float> whole(batch * total, width);
  core.forward(q, k, v, whole, {batch, total}, {batch, total}, false);
  CHECK(reference::relative_error(first[1], rows_of(whole, prefix, 1)) < 1e-5);
  CHECK(reference::relative_error(first[2], rows_of(whole, prefix + 1, 3)) < 1e-5);
}

TEMPLATE_TEST_CASE("A lone head's LSH attention runs as a task per round and per chunk",
                   "[threads]", Bidirectional, Causal) {
  // 900 tokens in chunks of 32, 2 rounds. Forward: 4 blocks of 256 rows hash their keys, a
  // block per round sorts and cuts it, then a block per 32 sorted positions of each round, 29,
  // runs the chunks that start there: 4 + 2 + 58 = 64 tasks. Backward: a block per round (its
  // chunks), the 58 chunk blocks, and 2 blocks of 512 rows that finish the gradients (62).
  // Causal chunks also end at bucket ends, so a block may run several: the same blocks.
  AttentionCore<LSHAttention<float>, TestType> core({.chunk = 32, .rounds = 2},
                                                    HeadLayout{1, 8, 8, 0});
  check_split(core, 900, 8, 64, 62);
}

namespace {

// Every projection's gradient after one backward, concatenated in visiting order.
template <class Policy>
std::vector<Matrix<typename Policy::Scalar>> projection_gradients(Policy& policy) {
  std::vector<Matrix<typename Policy::Scalar>> out;
  policy.visit_parameters([&](auto, auto&, auto& g) { out.push_back(g); });
  return out;
}

template <template <class> class Projection>
void low_rank_gradients_at_every_thread_count(typename Projection<float>::Config projection,
                                              ProjectionSharing sharing) {
  using Policy = LowRank<float, Projection>;
  for (const auto& shape : {SequenceShape{1, 896}, SequenceShape{3, 896, {896, 613, 7}}}) {
    AttentionCore<Policy> core({.projection = projection, .sharing = sharing},
                               HeadLayout{2, 16, 16, 5});
    std::vector<Matrix<float>> first;
    Result<float> one;
    for (const int threads : {1, 2, 3, 7}) {
      CAPTURE(Projection<float>::name, int(sharing), shape.batch, threads);
      core.policy().zero_grad();
      const auto r = run(core, shape, 16, threads);
      const auto grads = projection_gradients(core.policy());
      if (threads == 1) {
        one = r;
        first = grads;
        REQUIRE(!first.empty());
        for (const auto& g : first)
          REQUIRE(!g.isZero());
        continue;
      }
      CHECK(same_bits(r.dq, one.dq));
      CHECK(same_bits(r.dk, one.dk));
      CHECK(same_bits(r.dv, one.dv));
      REQUIRE(grads.size() == first.size());
      for (std::size_t i = 0; i < grads.size(); ++i)
        CHECK(same_bits(grads[i], first[i]));
    }
  }
}

}  // namespace

TEST_CASE("LowRank's projection gradients have the same bits at every thread count",
          "[threads][determinism][lowrank]") {
  // Two heads whose gradients every sequence adds to: one E and F for both heads, one E for
  // keys and values, one of each per head; the dense projection in blocks of 128 tokens (896:
  // 7 blocks; 613 valid tokens end inside one), and the convolution's one task per projection.
  for (const auto sharing :
       {ProjectionSharing::headwise, ProjectionSharing::key_value, ProjectionSharing::none})
    low_rank_gradients_at_every_thread_count<DenseProjection>({.k = 200, .n_max = 1000}, sharing);
  low_rank_gradients_at_every_thread_count<ConvProjection>({.kernel = 7}, ProjectionSharing::none);
}

TEST_CASE("A lone head's LowRank backward runs as query blocks, then blocks of tokens",
          "[threads][lowrank]") {
  // 900 queries in blocks of 192 (two query tiles of 96): 5 blocks (one task running them in
  // order at one thread). Then the projections, at any thread count: a task per 128 tokens of
  // E's and F's gradient columns (2 × 8) and of d_k, d_v (2 × 8), 32, the most tasks.
  AttentionCore<LowRank<float>> core({.projection = {.k = 200, .n_max = 900}},
                                     HeadLayout{1, 16, 16, 0});
  for (const int threads : {1, 2}) {
    const auto r = run(core, SequenceShape{1, 900}, 16, threads);
    CHECK(r.backward_tasks == 32);
  }
}

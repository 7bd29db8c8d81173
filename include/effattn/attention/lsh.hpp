#pragma once
// LSHAttention: Reformer's locality-sensitive-hashing attention over shared queries and keys.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "effattn/attention/attention_policy.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/lsh/chunks.hpp"
#include "effattn/attention/lsh/hashing.hpp"
#include "effattn/attention/lsh/lsh_config.hpp"
#include "effattn/attention/lsh/sorting.hpp"
#include "effattn/attention/random_state.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/finite.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// Reformer's LSH attention (Kitaev et al. 2020, docs/algorithms.md §4) for one head:
///
///   keys are the unit vectors k̂_j = k_j / ‖k_j‖; logits s · q_i · k̂_j, s = 1/√d_k by default.
///   That default reproduces the paper's code (trax's efficient_attention.attend normalises
///   the shared keys, then divides them by √d), Hugging Face's ReformerModel
///   (_len_and_dim_norm: unit length, then ÷√head_size) and reformer-pytorch (unit keys,
///   dots · d^{-1/2}). `scale` = 1 gives unit keys without temperature, as no reference
///   implementation does. In MultiHeadAttention the policy is shared-QK (`shared_qk`):
///   k = q, one projection serves both.
///
/// Each of `rounds` hash rounds draws a random rotation R (d_k × b/2, N(0, 1)) and puts token
/// j in bucket argmax([k_j R ; −k_j R]) ∈ [0, b). Tokens are sorted by (bucket, position) with
/// a counting sort, cut into chunks of `chunk` tokens, and each query attends to the keys of
/// its own chunk, `look_back` chunks before it and `look_forward` after it (circularly).
/// Masks use original positions: causal (key after query), key padding (padded tokens get an
/// extra last bucket and are never keys), optionally other buckets (`same_bucket`). A token
/// attends to itself only when nothing else is allowed (logit −1e5, not −∞). Each round gives
/// o_i⁽ʳ⁾ and its log-sum-exp L_i⁽ʳ⁾; the result is Σ_r exp(L_i⁽ʳ⁾ − logsumexp_r L_i⁽ʳ⁾) o_i⁽ʳ⁾.
/// With `dedup`, a logit is lowered by log(number of rounds in which i may attend to j),
/// so a key met in several rounds is not counted several times.
///
/// Buckets: `buckets` = 0 chooses b ≈ 2n/c per call (even; at least 2); 1 means no hashing. Above
/// 128 buckets the rotation is factorised, b = b1·b2 with bucket h1 + b1·h2 from two argmaxes over
/// b1/2 and b2/2 columns, to keep hashing cheap. Rotations are drawn from the block's seed per
/// (head, round), column by column, so the first columns do not depend on how many a call
/// needs; `rotation()` reads one, `set_rotation()` fixes one (to load or reproduce a run).
///
/// Any n works: the last chunk is shorter (equivalent to internal padding that is never
/// attended). Rows at padded positions give 0. Cost per head: rounds · (4·n·w·d for the
/// w ≤ (look_back + 1 + look_forward)·c keys a query sees, + 2·n·d·b/2 hashing) + O(rounds·n)
/// sorting; memory O(rounds·n) per head (the orders, buckets and chunk cuts its blocks
/// share) and O(c·w) per thread; forward keeps each round's order and buckets and each row's
/// log-sum-exp (O(rounds·n)) for backward, which reuses them: the buckets are held fixed,
/// gradients flow through q, k (including the normalisation) and v. A head's rounds and chunks
/// are tasks that all threads share (forward_blocks), with the same bits at any thread count.
template <class S = float>
class LSHAttention {
 public:
  using Scalar = S;
  static constexpr const char* name = "lsh";
  static constexpr bool supports_causal = true;
  static constexpr bool supports_cross_attention = false;
  static constexpr bool splits_queries = false;  // the sort spans the whole sequence
  /// MultiHeadAttention computes keys as its queries: no w_k, and k = q here.
  static constexpr bool shared_qk = true;

  /// Most buckets a call may use (ids are int32, and each thread counts every bucket).
  static constexpr Index max_buckets = Index(1) << 22;

  using Config = LSHConfig;

  /// What backward reuses: every round's sorted order and buckets, and each row's
  /// log-sum-exp over all rounds as max + log_sum (kept apart: a row that only sees itself
  /// has max −1e5, where float cannot hold max + log(rounds) to the precision needed;
  /// log_sum = +∞ marks a row that saw no key).
  struct Saved {
    std::vector<std::int32_t> order;   ///< rounds × n: tokens in (bucket, position) order
    std::vector<std::int32_t> bucket;  ///< rounds × n: bucket of each token
    RowVector<S> max, log_sum;
    std::size_t bytes() const {
      return sizeof(std::int32_t) * (order.size() + bucket.size()) +
             sizeof(S) * static_cast<std::size_t>(max.size() + log_sum.size());
    }
  };

  using BucketPlan = detail::lsh::BucketPlan;

  LSHAttention() : LSHAttention(Config{}, HeadLayout{}) {}
  LSHAttention(Config config, HeadLayout layout)
      : config_(config),
        layout_(layout),
        rotations_(std::max<Index>(layout.heads, 0), std::max<Index>(config.rounds, 0),
                   layout.d_key, layout.seed) {
    constexpr const char* who = "LSHAttention";
    detail::require(config_.chunk > 0, who, "chunk", config_.chunk, "at least 1 token");
    detail::require(config_.rounds > 0, who, "rounds", config_.rounds, "at least 1 hash round");
    detail::require(config_.buckets >= 0 && (config_.buckets <= 1 || config_.buckets % 2 == 0), who,
                    "buckets", config_.buckets,
                    "an even number of buckets (angular LSH takes ±xR), 1 (no hashing: one "
                    "bucket), or 0 for about 2n/chunk");
    detail::require(config_.buckets <= max_buckets, who, "buckets", config_.buckets,
                    detail::concat("at most ", max_buckets,
                                   " (bucket ids are 32-bit and each thread counts them; more "
                                   "buckets than tokens only leaves buckets empty)"));
    detail::require(config_.look_back >= 0, who, "look_back", config_.look_back,
                    "a number of chunks, at least 0");
    detail::require(config_.look_forward >= 0, who, "look_forward", config_.look_forward,
                    "a number of chunks, at least 0");
    detail::require(!config_.scale || (std::isfinite(*config_.scale) && *config_.scale > 0), who,
                    "scale", config_.scale.value_or(0.0),
                    "a finite positive number (or none for 1/sqrt(d_k))");
    detail::require(layout_.heads > 0 && layout_.d_key > 0, who, "layout",
                    detail::concat(layout_.heads, " heads of key width ", layout_.d_key),
                    "at least one head of width at least 1");
  }

  const Config& config() const { return config_; }
  S scale(Index d_k) const {
    return static_cast<S>(config_.scale ? *config_.scale : 1.0 / std::sqrt(double(d_k)));
  }

  /// The buckets a sequence of n tokens is hashed into.
  BucketPlan plan(Index n) const {
    return detail::lsh::plan_buckets(n, config_.chunk, config_.buckets);
  }

  /// Draws every rotation anew from `seed` (fixed ones are dropped too).
  void redraw(std::uint64_t seed) { rotations_.redraw(seed); }

  /// The rotations as a checkpoint holds them: the seed they are drawn from, and each rotation
  /// fixed by set_rotation as "rotation.<head>.<round>".
  RandomState<S> random_state() const {
    RandomState<S> state{rotations_.seed(), {}};
    rotations_.for_each_fixed([&](Index head, Index round, const Matrix<S>& r) {
      state.tensors.emplace_back(detail::concat("rotation.", head, ".", round), r);
    });
    return state;
  }
  bool claims_random_tensor(const std::string& tensor) const {
    return tensor.starts_with("rotation.");
  }
  /// Why `state` cannot be these rotations (no seed, a rotation of no (head, round) or of
  /// another height), or "".
  std::string check_random_state(const RandomState<S>& state) const {
    if (!state.seed) return "no seed";
    for (const auto& [tensor, r] : state.tensors) {
      const auto at = parse_rotation(tensor);
      if (!at) return detail::concat("'", tensor, "', not rotation.<head>.<round> of this layout");
      if (r.rows() != layout_.d_key || r.cols() < 1)
        return detail::concat("'", tensor, "' of ", r.rows(), "×", r.cols(),
                              " for d_k = ", layout_.d_key, " rows and at least one column");
    }
    return {};
  }
  /// Takes the seed and fixed rotations of a state check_random_state accepts.
  void set_random_state(const RandomState<S>& state) {
    rotations_.redraw(*state.seed);
    for (const auto& [tensor, r] : state.tensors) {
      const auto at = parse_rotation(tensor);
      rotations_.fix(at->first, at->second, r);
    }
  }

  /// The first `columns` columns of the rotation of (head, round): d_k × columns.
  Matrix<S> rotation(Index head, Index round, Index columns) const {
    check_head_round(head, round);
    Matrix<S> r(layout_.d_key, columns);
    rotations_.copy(head, round, columns, r);
    return r;
  }
  /// Fixes the rotation of (head, round) to r (d_k × w): calls that need at most w columns
  /// use its first ones; needing more is an effattn::Error.
  void set_rotation(Index head, Index round, const Matrix<S>& r) {
    check_head_round(head, round);
    detail::require(r.rows() == layout_.d_key && r.cols() > 0, "LSHAttention", "rotation",
                    detail::concat("a ", r.rows(), "×", r.cols(), " matrix"),
                    detail::concat("d_k = ", layout_.d_key, " rows and at least one column"));
    rotations_.fix(head, round, r);
  }

  Saved make_saved(Index n_q, Index /*n_k*/) const {
    const auto size = static_cast<std::size_t>(config_.rounds * n_q);
    return Saved{std::vector<std::int32_t>(size), std::vector<std::int32_t>(size),
                 RowVector<S>(n_q), RowVector<S>(n_q)};
  }

  void validate(Index n_q, Index n_k, Index d_k, Index d_v, bool /*causal*/) const {
    constexpr const char* who = "LSHAttention";
    detail::require(n_q == n_k, who, "n_k", n_k,
                    detail::concat("n_q = ", n_q,
                                   ": LSH attention is self-attention (queries and keys are "
                                   "one sorted sequence)"));
    detail::require(n_q > 0, who, "n_q", n_q, "at least 1 token");
    detail::require(n_q <= std::numeric_limits<std::int32_t>::max(), who, "n_q", n_q,
                    "at most 2^31 − 1 tokens");
    detail::require(d_k == layout_.d_key, who, "d_k", d_k,
                    detail::concat("the layout's key width, ", layout_.d_key));
    detail::require(d_v > 0, who, "d_v", d_v, "a head width of at least 1");
    const Index columns = plan(n_q).columns();
    detail::require(plan(n_q).buckets <= max_buckets, who, "n_q", n_q,
                    detail::concat("a length whose automatic bucket count (", plan(n_q).buckets,
                                   ") is at most ", max_buckets, "; set `buckets`"));
    // The call is being planned: draw the columns it needs now, so that the kernels only
    // read rotations (no drawing, no allocation inside the parallel region).
    rotations_.prepare(columns, who,
                       detail::concat("for ", plan(n_q).buckets, " buckets at n = ", n_q));
  }

  /// Logits computed (query–key pairs, masked ones included) and tokens hashed since the
  /// last reset_work(), over all heads, rounds and calls: the work actually done, for
  /// benchmarks (flops = 2·pairs·(d_k + d_v) + 2·hashed·d_k·columns).
  struct Work {
    double pairs = 0, hashed_columns = 0;
    double flops(Index d_k, Index d_v) const {
      return 2.0 * pairs * double(d_k + d_v) + 2.0 * hashed_columns * double(d_k);
    }
  };
  Work work() const {
    const std::lock_guard<std::mutex> lock(work_lock_.mutex);
    return work_;
  }
  void reset_work() {
    const std::lock_guard<std::mutex> lock(work_lock_.mutex);
    work_ = {};
  }
  /// Adds to work(): what a call computed (mpi::ShardedLSH records each rank's share).
  void record_work(double pairs, double hashed_columns) const {
    const std::lock_guard<std::mutex> lock(work_lock_.mutex);
    work_.pairs += pairs;
    work_.hashed_columns += hashed_columns;
  }

  std::size_t scratch_bytes(Index n_q, Index /*n_k*/, Index d_k, Index d_v) const {
    using W = Workspace;
    const Index n = n_q, c = std::min(config_.chunk, n), w = config_.window(n);
    const Index rows = block_rows(n, true), keys = block_keys(n, true);
    const BucketPlan bp = plan(n);
    // A round's hashing and counting sort; a block's chunk (gathered rows, logits) and its
    // result (forward: output, max and sum; backward: its gradients).
    const std::size_t hashing = std::max(detail::lsh::hashing_bytes<S>(n, d_k, config_.rounds, bp),
                                         W::bytes_for<Index>(bp.buckets + 2));
    const std::size_t chunk = Chunk::bytes(c, w, d_k, d_v) +
                              std::max(W::bytes_for<S>(rows * d_v) + 3 * W::bytes_for<S>(rows),
                                       ChunkGradients::bytes(c, w, rows, keys, d_k, d_v));
    // forward() and backward() called on their own take the blocks' shared memory here.
    return W::bytes_for<S>(shared_scalars(n, n, d_k, d_v, true)) + std::max(hashing, chunk);
  }

  /// Blocks (attention_policy.hpp), the same at any thread count.
  /// - Forward: blocks of 256 rows that hash their keys in every round (and prepare their
  ///   rows); a block per round that sorts it and cuts it into chunks; then, round-major, a
  ///   block per c sorted positions of each round, which runs the chunks that start there (one;
  ///   causal chunks end at bucket ends, so there one or more): their queries over their
  ///   windows, each row with its own max, merged into the rows' running max, sum and output
  ///   once every block of the rounds before has merged (a round's blocks merge side by side:
  ///   they hold each row once). So every row adds its rounds in order; the last round's merge
  ///   normalises it.
  /// - Backward: a block per round (its chunks, its share of D = dO·O and of the key norms),
  ///   the chunk blocks, whose gradients are added to their rows in block order, then blocks of
  ///   512 rows that finish the gradients.
  ///
  /// With threads to spare (`spread` ≥ 2: at least two threads per (sequence, head)) the blocks
  /// are tasks; otherwise a call is one task that runs them in order, so that each thread keeps
  /// one head's rows in its caches (interleaving 8 heads' blocks on one thread cost 10–25 %).
  /// Both merge in the same order: the same bits.
  Index forward_blocks(Index n_q, Index, Index, Index, bool, Index spread) const {
    return spread >= 2 ? split_forward_blocks(n_q) : 1;
  }
  Index backward_blocks(Index n_q, Index, Index, Index, bool, Index spread) const {
    return spread >= 2 ? split_backward_blocks(n_q) : 1;
  }
  Index split_forward_blocks(Index n) const {
    return hash_blocks(n) + config_.rounds * (1 + chunk_blocks(n));
  }
  Index split_backward_blocks(Index n) const {
    return config_.rounds * (1 + chunk_blocks(n)) + finish_blocks(n);
  }
  /// Chunk blocks per round: one per c sorted positions (every such span holds a chunk start,
  /// as no chunk is longer than c).
  Index chunk_blocks(Index n) const { return (n + config_.chunk - 1) / config_.chunk; }
  /// What a call's blocks share: per row 1/‖k‖, the running max and sum (forward without a
  /// Saved) and D; per round the sorted order and buckets (likewise) and the chunk cuts; per
  /// hashing block whether its values are finite.
  Index shared_scalars(Index n_q, Index, Index, Index, bool) const {
    const Index ints = 2 * config_.rounds * n_q + hash_blocks(n_q) +
                       Rounds::storage_ints(config_, max_chunks(n_q), n_q);
    const Index size = Index(sizeof(S)), int_size = Index(sizeof(std::int32_t));
    return 4 * n_q + (ints * int_size + size - 1) / size;
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Saved* saved,
               const HeadContext& ctx, Workspace& ws) const {
    detail::forward_in_block_order(*this, q, k, v, out, saved, ctx, ws);
  }

  template <class Order>
  void forward_block(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
                     Saved* saved, const HeadContext& ctx, Workspace& ws, const Order& order,
                     S* shared) const {
    const detail::EigenSingleThreadScope serial_products;
    if (ctx.spread >= 2) return forward_step(block, q, k, v, out, saved, ctx, ws, order, shared);
    for (Index b = 0; b < split_forward_blocks(q.rows()); ++b)
      forward_step(b, q, k, v, out, saved, ctx, ws, detail::InCallOrder{}, shared);
  }

  template <class Order>
  void backward_block(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                      ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                      const HeadContext& ctx, Workspace& ws, const Order& order, S* shared) const {
    const detail::EigenSingleThreadScope serial_products;
    if (ctx.spread >= 2)
      return backward_step(block, q, k, v, out, d_out, saved, d_q, d_k, d_v, ctx, ws, order,
                           shared);
    for (Index b = 0; b < split_backward_blocks(q.rows()); ++b)
      backward_step(b, q, k, v, out, d_out, saved, d_q, d_k, d_v, ctx, ws, detail::InCallOrder{},
                    shared);
  }

  // Block `block` of split_forward_blocks().
  template <class Order>
  void forward_step(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
                    Saved* saved, const HeadContext& ctx, Workspace& ws, const Order& order,
                    S* shared) const {
    Workspace::Frame frame(ws);
    const Index n = q.rows(), length = ctx.key_length, r = config_.rounds;
    const SharedRows sh = shared_rows(shared, n);
    std::int32_t* sorted = saved ? saved->order.data() : sh.order;
    std::int32_t* bucket = saved ? saved->bucket.data() : sh.bucket;
    S* m = saved ? saved->max.data() : sh.max;
    S* z = saved ? saved->log_sum.data() : sh.sum;
    Rounds rounds(config_, max_chunks(n), sorted, bucket, n, length, ctx.causal, sh.cuts);
    const Index h = hash_blocks(n);
    if (block < h) {  // hash_span rows: their buckets in every round, 1/‖k‖, start values
      const Index t0 = block * hash_span, t1 = std::min(n, t0 + hash_span);
      hash_rows(k, length, ctx.head, t0, t1, bucket, ws);
      detail::lsh::inverse_norms(k, length, t0, t1, sh.inv_norm);
      sh.finite[block] = detail::all_finite(v.middleRows(t0, t1 - t0));
      out.middleRows(t0, t1 - t0).setZero();
      for (Index t = t0; t < t1; ++t) {  // a padded row sees no key: log_sum = +∞
        m[t] = -std::numeric_limits<S>::infinity();
        z[t] = t < length ? S(0) : std::numeric_limits<S>::infinity();
      }
      record_work(0, double((std::min(t1, length) - std::min(t0, length)) * r * plan(n).columns()));
      order([] {});
      return;
    }
    if (block < h + r) {  // round block − h: its (bucket, position) order and its chunks
      order.wait(h);
      const Index round = block - h;
      Workspace::Frame sort_frame(ws);
      Index* count = ws.take<Index>(plan(n).buckets + 2);
      detail::lsh::sort_by_bucket(bucket + round * n, n, length, plan(n).buckets,
                                  sorted + round * n, count);
      rounds.cut(round);
      order([] {});
      return;
    }
    order.wait(h + r);
    const Index round = (block - h - r) / chunk_blocks(n);
    rounds.select(round);
    const auto [c0, c1] = chunks_of_block(rounds, (block - h - r) % chunk_blocks(n));
    if (c0 == c1) return order([] {});  // past the valid tokens
    Chunk chunk(config_, scale(q.cols()), q, k, v, sh.inv_norm, ws);
    const Index rows = block_rows(n, ctx.causal);
    auto o = ws.matrix<S>(rows, v.cols());
    S* row_max = ws.take<S>(rows);
    S* row_sum = ws.take<S>(rows);
    S* factor = ws.take<S>(rows);
    detail::lsh::prefetch_rows(out, rounds.order, rounds.first(c0), rounds.stop(c1 - 1), true);
    const bool exact_mask = !std::all_of(sh.finite, sh.finite + h, [](auto f) { return f != 0; });
    const double pairs = attend_chunks(rounds, c0, c1, chunk, exact_mask, o, row_max, row_sum);
    // A round's chunks hold each row once: its blocks merge side by side, once every block of
    // the rounds before has merged (their steps run after their merges).
    order.wait(h + r + round * chunk_blocks(n));
    merge_chunks(rounds, c0, c1, chunk, o, row_max, row_sum, factor, out, m, z, round + 1 == r);
    order([] {});
    record_work(pairs, 0);
  }

  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    detail::backward_in_block_order(*this, q, k, v, out, d_out, saved, d_q, d_k, d_v, ctx, ws);
  }

  // Block `block` of split_backward_blocks().
  template <class Order>
  void backward_step(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                     ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                     const HeadContext& ctx, Workspace& ws, const Order& order, S* shared) const {
    Workspace::Frame frame(ws);
    const Index n = q.rows(), length = ctx.key_length, r = config_.rounds;
    const Index chunk_end = r * (1 + chunk_blocks(n));
    const SharedRows sh = shared_rows(shared, n);
    Rounds rounds(config_, max_chunks(n), saved.order.data(), saved.bucket.data(), n, length,
                  ctx.causal, sh.cuts);
    if (block < r) {  // round `block`'s chunks; its share of the rows: 1/‖k‖, D = dO·O, zeros
      rounds.cut(block);
      const Index t0 = block * n / r, t1 = (block + 1) * n / r;
      detail::lsh::inverse_norms(k, length, t0, t1, sh.inv_norm);
      for (Index t = t0; t < t1; ++t)
        sh.delta[t] = t < length ? d_out.row(t).dot(out.row(t)) : S(0);
      d_q.middleRows(t0, t1 - t0).setZero();
      d_k.middleRows(t0, t1 - t0).setZero();  // accumulates d k̂ first
      d_v.middleRows(t0, t1 - t0).setZero();
      order([] {});
      return;
    }
    if (block < chunk_end) {
      order.wait(r);
      rounds.select((block - r) / chunk_blocks(n));
      // (named, not bound: clang 14 cannot capture a structured binding)
      const std::pair<Index, Index> span = chunks_of_block(rounds, (block - r) % chunk_blocks(n));
      const Index c0 = span.first, c1 = span.second;
      if (c0 == c1) return order([] {});
      Chunk chunk(config_, scale(q.cols()), q, k, v, sh.inv_norm, ws);
      ChunkGradients g(chunk, block_rows(n, ctx.causal), block_keys(n, ctx.causal), ws);
      for (const auto* grad : {&d_q, &d_k, &d_v})
        detail::lsh::prefetch_rows(*grad, rounds.order, rounds.first(c0), rounds.stop(c1 - 1),
                                   true);
      chunk_gradients(rounds, c0, c1, chunk, d_out, sh.delta, saved.max.data(),
                      saved.log_sum.data(), g);
      order([&] { add_chunk_gradients(rounds, c0, chunk, g, d_q, d_k, d_v); });
      return;
    }
    order.wait(chunk_end);  // every chunk added: the scale, and through k̂ = k/‖k‖
    const Index t0 = (block - chunk_end) * finish_rows, rows = std::min(finish_rows, n - t0);
    finish_gradients(k.middleRows(t0, rows), sh.inv_norm + t0,
                     std::clamp<Index>(length - t0, 0, rows), d_q.middleRows(t0, rows),
                     d_k.middleRows(t0, rows));
  }

  // The pieces of the blocks, for mpi::ShardedLSH too, which runs the chunks of each round on
  // the rank that holds them, on rows gathered from other ranks (Chunk::rows_from).

  using Rounds = detail::lsh::Chunking;
  using Chunk = detail::lsh::GatheredChunk<S>;

  /// The first `columns` columns of the rotation of (head, round), into dst (d_k × columns).
  template <class Dst>
  void copy_rotation(Index head, Index round, Index columns, Dst&& dst) const {
    rotations_.copy(head, round, columns, dst);
  }

  /// Forward of chunks [c0, c1) of the selected round: their queries' softmax over their
  /// windows, each row with its own max, in sorted order from rounds.first(c0): rows of o
  /// (Σ_j exp(logit_j − max)·v_j), row_max and row_sum. Returns the query–key pairs computed.
  /// With exact_mask, a row adds only the keys it sees (probability ≠ 0): a masked key's 0 · ∞
  /// or 0 · NaN in P·V would otherwise reach it.
  template <class AnyRounds, class O>
  double attend_chunks(const AnyRounds& rounds, Index c0, Index c1, Chunk& chunk, bool exact_mask,
                       O& o, S* row_max, S* row_sum) const {
    double pairs = 0;
    for (Index ci = c0; ci < c1; ++ci) {
      const Index rows = chunk.logits(rounds, ci), at = rounds.first(ci) - rounds.first(c0);
      pairs += double(rows * chunk.keys);
      auto p = chunk.p.topLeftCorner(rows, chunk.keys);
      for (Index a = 0; a < rows; ++a) {  // every row has its own key: max ≥ −1e5
        row_max[at + a] = -std::numeric_limits<S>::infinity();
        row_sum[at + a] = S(0);
        detail::online_softmax_row(&p(a, 0), p.cols(), row_max[at + a], row_sum[at + a]);
      }
      auto o_c = o.middleRows(at, rows);
      if (exact_mask) {
        o_c.setZero();
        for (Index a = 0; a < rows; ++a)
          for (Index b = 0; b < chunk.keys; ++b)
            if (p(a, b) != S(0)) o_c.row(a) += p(a, b) * chunk.vs.row(b);
      } else {
        chunk.mul.assign(o_c, p, chunk.vs.topRows(chunk.keys));
      }
    }
    return pairs;
  }

  /// Merges attend_chunks' result into its rows (chunk.row(t)) of out (Σ exp(logit − m)·v), m
  /// (running max) and z (running sum); with `last`, the rows are finished: out divided by z,
  /// z replaced by log z (+∞ for a row that saw nothing).
  /// `factor` is scratch of one value per row.
  template <class AnyRounds, class O>
  void merge_chunks(const AnyRounds& rounds, Index c0, Index c1, const Chunk& chunk, const O& o,
                    const S* row_max, const S* row_sum, S* factor, View<S> out, S* m, S* z,
                    bool last) const {
    const Index s0 = rounds.first(c0), rows = rounds.stop(c1 - 1) - s0;
    for (Index a = 0; a < rows; ++a)  // the rows' factors, with one vectorised exp
      factor[a] = detail::merge_exponent(m[chunk.row(rounds.order[s0 + a])], row_max[a]);
    detail::exp_shifted_sum(factor, rows, S(0));
    for (Index s = s0; s < s0 + rows; ++s) {
      const Index t = chunk.row(rounds.order[s]), a = s - s0;
      detail::merge_unnormalised_row(out.row(t), m[t], z[t], o.row(a), row_max[a], row_sum[a],
                                     factor[a]);
      if (!last) continue;
      if (z[t] > S(0)) out.row(t) *= S(1) / z[t];
      z[t] = z[t] > S(0) ? std::log(z[t]) : std::numeric_limits<S>::infinity();
    }
  }

  /// Workspace forward_chunks or backward_chunks take, with their Chunk, for n tokens.
  std::size_t chunk_loop_bytes(Index n, Index d_k, Index d_v) const {
    using W = Workspace;
    const Index c = std::min(config_.chunk, n), w = config_.window(n);
    return Chunk::bytes(c, w, d_k, d_v) +
           std::max(W::bytes_for<S>(c * d_v) + 3 * W::bytes_for<S>(c),
                    ChunkGradients::bytes(c, w, c, w, d_k, d_v));
  }

  /// The chunk loop of a forward: for every round and every chunk ci with owns(round, ci),
  /// attend_chunks then merge_chunks into out, m and z (not finished). Returns the query–key
  /// pairs computed.
  template <class AnyRounds, class Owns>
  double forward_chunks(AnyRounds& rounds, Chunk& chunk, View<S> out, S* m, S* z, Owns&& owns,
                        Workspace& ws) const {
    Workspace::Frame frame(ws);
    const Index c = chunk.qs.rows();
    auto o = ws.matrix<S>(c, out.cols());
    S* row_max = ws.take<S>(c);
    S* row_sum = ws.take<S>(c);
    S* factor = ws.take<S>(c);
    const bool exact_mask = !detail::all_finite(chunk.v_);
    double pairs = 0;
    for (Index round = 0; round < config_.rounds; ++round) {
      rounds.select(round);
      for (Index ci = 0; ci < rounds.chunks(); ++ci) {
        if (!owns(round, ci)) continue;
        pairs += attend_chunks(rounds, ci, ci + 1, chunk, exact_mask, o, row_max, row_sum);
        merge_chunks(rounds, ci, ci + 1, chunk, o, row_max, row_sum, factor, out, m, z, false);
      }
    }
    return pairs;
  }

  /// Chunks' gradients before they are added to their rows: of their queries' unscaled logits
  /// (d_qs, in sorted order), of their windows' unit keys and values (d_ks, d_vs, of the tokens
  /// `token`), and a chunk's scratch.
  struct ChunkGradients {
    /// For at most `rows` queries and `keys` window keys (over all the chunks).
    ChunkGradients(const Chunk& chunk, Index max_rows, Index max_keys, Workspace& ws)
        : d_o(ws.matrix<S>(chunk.qs.rows(), chunk.vs.cols())),
          dp(ws.matrix<S>(chunk.qs.rows(), chunk.p.cols())),
          d_qs(ws.matrix<S>(max_rows, chunk.qs.cols())),
          d_ks(ws.matrix<S>(max_keys, chunk.ks.cols())),
          d_vs(ws.matrix<S>(max_keys, chunk.vs.cols())),
          token(ws.take<std::int32_t>(max_keys)) {}
    static std::size_t bytes(Index c, Index w, Index rows, Index keys, Index d_k, Index d_v) {
      using W = Workspace;
      return W::bytes_for<S>(c * d_v) + W::bytes_for<S>(c * w) + W::bytes_for<S>(rows * d_k) +
             W::bytes_for<S>(keys * d_k) + W::bytes_for<S>(keys * d_v) +
             W::bytes_for<std::int32_t>(keys);
    }
    Eigen::Map<Matrix<S>, Eigen::Aligned64> d_o, dp, d_qs, d_ks, d_vs;
    std::int32_t* token;
    Index rows = 0, keys = 0;
  };

  /// The gradients of chunks [c0, c1) of the selected round into g, from d_out, delta (dO·O),
  /// and each row's log-sum-exp as max and log_sum.
  template <class AnyRounds>
  void chunk_gradients(const AnyRounds& rounds, Index c0, Index c1, Chunk& chunk,
                       ConstView<S> d_out, const S* delta, const S* max, const S* log_sum,
                       ChunkGradients& g) const {
    g.rows = g.keys = 0;
    for (Index ci = c0; ci < c1; ++ci) {
      const Index m = chunk.logits(rounds, ci), q0 = rounds.first(ci), keys = chunk.keys;
      if (!chunk.gathers_rows() && ci + 1 < rounds.chunks())  // the next chunk's d_out
        detail::lsh::prefetch_rows(d_out, rounds.order, rounds.first(ci + 1), rounds.stop(ci + 1));
      auto p = chunk.p.topLeftCorner(m, keys);
      for (Index a = 0; a < m; ++a) {
        const Index r = chunk.row(rounds.order[q0 + a]);
        g.d_o.row(a) = d_out.row(r);
        p.row(a).array() -= max[r];  // exp(logit − max − log_sum), max first
        detail::exp_shifted_sum(&p(a, 0), keys, log_sum[r]);
      }
      auto d_o_c = g.d_o.topRows(m);
      auto d_vs_c = g.d_vs.middleRows(g.keys, keys);
      chunk.mul.assign(d_vs_c, p.transpose(), d_o_c);
      auto dp_c = g.dp.topLeftCorner(m, keys);
      chunk.mul.assign(dp_c, d_o_c, chunk.vs.topRows(keys).transpose());
      for (Index a = 0; a < m; ++a) {
        const S da = delta[chunk.row(rounds.order[q0 + a])];
        dp_c.row(a) = (p.row(a).array() * (dp_c.row(a).array() - da)).matrix();
        dp_c(a, chunk.self[a]) = S(0);  // the self logit is a constant
      }
      auto d_qs_c = g.d_qs.middleRows(g.rows, m);
      chunk.mul.assign(d_qs_c, dp_c, chunk.ks.topRows(keys));
      auto d_ks_c = g.d_ks.middleRows(g.keys, keys);
      chunk.mul.assign(d_ks_c, dp_c.transpose(), chunk.qs.topRows(m));  // qs carries the scale
      std::copy(chunk.token, chunk.token + keys, g.token + g.keys);
      g.rows += m;
      g.keys += keys;
    }
  }

  /// Adds chunk_gradients' result (chunks from c0 on) to its rows (chunk.row(t)): d_q that of
  /// the unscaled queries' logits, d_k that of the unit keys k̂, d_v that of the values.
  template <class AnyRounds>
  void add_chunk_gradients(const AnyRounds& rounds, Index c0, const Chunk& chunk,
                           const ChunkGradients& g, View<S> d_q, View<S> d_k, View<S> d_v) const {
    const Index s0 = rounds.first(c0);
    for (Index a = 0; a < g.rows; ++a)
      d_q.row(chunk.row(rounds.order[s0 + a])) += g.d_qs.row(a);
    for (Index b = 0; b < g.keys; ++b) {
      const Index r = chunk.row(g.token[b]);
      d_k.row(r) += g.d_ks.row(b);
      d_v.row(r) += g.d_vs.row(b);
    }
  }

  /// The chunk loop of a backward: chunk_gradients then add_chunk_gradients for every round
  /// and every chunk ci with owns(round, ci).
  template <class AnyRounds, class Owns>
  void backward_chunks(AnyRounds& rounds, Chunk& chunk, ConstView<S> d_out, const S* delta,
                       const S* max, const S* log_sum, View<S> d_q, View<S> d_k, View<S> d_v,
                       Owns&& owns, Workspace& ws) const {
    Workspace::Frame frame(ws);
    ChunkGradients g(chunk, chunk.qs.rows(), chunk.p.cols(), ws);
    for (Index round = 0; round < config_.rounds; ++round) {
      rounds.select(round);
      for (Index ci = 0; ci < rounds.chunks(); ++ci) {
        if (!owns(round, ci)) continue;
        chunk_gradients(rounds, ci, ci + 1, chunk, d_out, delta, max, log_sum, g);
        add_chunk_gradients(rounds, ci, chunk, g, d_q, d_k, d_v);
      }
    }
  }

  /// The last step of backward: d_q times the logit scale, and d_k from the gradient of the
  /// unit keys k̂ = k/‖k‖ (rows [0, rows) of k, with their inverse norms).
  void finish_gradients(ConstView<S> k, const S* inv_norm, Index rows, View<S> d_q,
                        View<S> d_k) const {
    d_q *= scale(k.cols());
    for (Index t = 0; t < rows; ++t) {  // through k̂ = k/‖k‖: (I − k̂k̂ᵀ) d k̂ / ‖k‖
      const S inv = inv_norm[t];
      const S along = inv * k.row(t).dot(d_k.row(t));
      d_k.row(t) = inv * (d_k.row(t) - along * inv * k.row(t));
    }
  }

 private:
  // (head, round) of a tensor named "rotation.<head>.<round>" within the layout, if it is one.
  std::optional<std::pair<Index, Index>> parse_rotation(const std::string& tensor) const {
    Index head = 0, round = 0;
    std::size_t at = std::string("rotation.").size();
    const auto number = [&](Index& value) {
      const std::size_t start = at;
      value = 0;
      while (at < tensor.size() && tensor[at] >= '0' && tensor[at] <= '9' && at - start < 9)
        value = value * 10 + (tensor[at++] - '0');
      return at > start;
    };
    if (!tensor.starts_with("rotation.") || !number(head) || at >= tensor.size() ||
        tensor[at++] != '.' || !number(round) || at != tensor.size() || head >= layout_.heads ||
        round >= config_.rounds)
      return std::nullopt;
    return std::pair{head, round};
  }

  void check_head_round(Index head, Index round) const {
    detail::require(head >= 0 && head < layout_.heads, "LSHAttention", "head", head,
                    detail::concat("a head in [0, ", layout_.heads, ")"));
    detail::require(round >= 0 && round < config_.rounds, "LSHAttention", "round", round,
                    detail::concat("a round in [0, ", config_.rounds, ")"));
  }

  // Rows a forward's hashing block takes (the height of its products).
  static constexpr Index hash_span = detail::lsh::hash_rows;
  Index hash_blocks(Index n) const { return (n + hash_span - 1) / hash_span; }
  // Rows a backward's finishing block takes.
  static constexpr Index finish_rows = 512;
  Index finish_blocks(Index n) const { return (n + finish_rows - 1) / finish_rows; }
  Index max_chunks(Index n) const {
    return detail::lsh::max_chunks(n, config_.chunk, plan(n).buckets);
  }
  // Most queries and window keys of one chunk block: the chunks starting in c sorted
  // positions reach at most 2c − 1 positions (causal; one chunk otherwise), and their windows,
  // within (look_back + look_forward + 2)·c positions, hold each key at most
  // look_back + 1 + look_forward times.
  Index block_rows(Index n, bool causal) const {
    return std::min(n, (causal ? 2 : 1) * config_.chunk);
  }
  Index block_keys(Index n, bool causal) const {
    const Index lb = config_.look_back, lf = config_.look_forward;
    return causal ? (lb + 1 + lf) * std::min(n, (lb + lf + 2) * config_.chunk) : config_.window(n);
  }
  // Chunks [c0, c1) of the selected round that start in sorted positions [j·c, (j + 1)·c).
  std::pair<Index, Index> chunks_of_block(const Rounds& rounds, Index j) const {
    const auto starting_from = [&](Index s) {  // the first chunk that starts at s or later
      Index lo = 0, hi = rounds.chunks();
      while (lo < hi) {
        const Index mid = (lo + hi) / 2;
        if (rounds.first(mid) < s)
          lo = mid + 1;
        else
          hi = mid;
      }
      return lo;
    };
    return {starting_from(j * config_.chunk), starting_from((j + 1) * config_.chunk)};
  }

  // The blocks' shared memory (shared_scalars): scalars first, then integers.
  struct SharedRows {
    S *inv_norm, *max, *sum, *delta;
    std::int32_t *order, *bucket, *finite, *cuts;
  };
  SharedRows shared_rows(S* shared, Index n) const {
    const Index r = config_.rounds;
    auto* ints = reinterpret_cast<std::int32_t*>(shared + 4 * n);  // raw memory: see AttentionCore
    return {shared, shared + n,   shared + 2 * n,   shared + 3 * n,
            ints,   ints + r * n, ints + 2 * r * n, ints + 2 * r * n + hash_blocks(n)};
  }

  // The buckets of keys [t0, t1) in every round (padding gets the extra bucket b when sorted).
  void hash_rows(ConstView<S> k, Index length, Index head, Index t0, Index t1, std::int32_t* bucket,
                 Workspace& ws) const {
    detail::lsh::hash_keys<S>(
        k, length, config_.rounds, plan(k.rows()),
        [&](Index round, Index columns, auto&& dst) { copy_rotation(head, round, columns, dst); },
        bucket, ws, t0, t1);
  }

  Config config_;
  HeadLayout layout_;
  detail::lsh::Rotations<S> rotations_;
  mutable Work work_;
  mutable detail::CopyableMutex work_lock_;
};

static_assert(AttentionPolicy<LSHAttention<float>>);
static_assert(AttentionPolicy<LSHAttention<double>>);

}  // namespace effattn

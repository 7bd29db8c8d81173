#pragma once
// LSHAttention: Reformer's locality-sensitive-hashing attention over shared queries and keys.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "effattn/attention/attention_policy.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/lsh/chunks.hpp"
#include "effattn/attention/lsh/hashing.hpp"
#include "effattn/attention/lsh/lsh_config.hpp"
#include "effattn/attention/lsh/sorting.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/finite.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// Reformer's LSH attention (Kitaev et al. 2020, ALGORITHMS.md §4) for one head:
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
/// sorting; scratch O(rounds·n + c·w) per thread; forward keeps each round's order and
/// buckets and each row's log-sum-exp (O(rounds·n)) for backward, which reuses them: the
/// buckets are held fixed, gradients flow through q, k (including the normalisation) and v.
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
    const Index n = n_q, r = config_.rounds, c = std::min(config_.chunk, n), w = config_.window(n);
    const BucketPlan bp = plan(n);
    const std::size_t ints = W::bytes_for<std::int32_t>(r * n), scalars = W::bytes_for<S>(n);
    const std::size_t starts =
        W::bytes_for<std::int32_t>(detail::lsh::max_chunks(n, config_.chunk, bp.buckets) + 1);
    // 1/‖k‖, chunk boundaries, chunk of every token (dedup) and a chunk's gathered rows.
    const std::size_t common =
        scalars + starts + (config_.dedup ? ints + r * starts : 0) + Chunk::bytes(c, w, d_k, d_v);
    const std::size_t hashing =
        detail::lsh::hashing_bytes<S>(n, d_k, r, bp) + W::bytes_for<Index>(bp.buckets + 2);
    // Forward: order, buckets and log-sum-exp (when not saved), then hashing or the chunks.
    const std::size_t fwd =
        2 * ints + 2 * scalars +
        std::max(hashing, common + W::bytes_for<S>(c * d_v) + W::bytes_for<S>(c));
    // Backward: D, and the chunk's gradients.
    const std::size_t bwd = common + scalars + W::bytes_for<S>(c * d_v) + W::bytes_for<S>(c * w) +
                            W::bytes_for<S>(w * d_v) + W::bytes_for<S>(c * d_k) +
                            W::bytes_for<S>(w * d_k);
    return std::max(fwd, bwd);
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Saved* saved,
               const HeadContext& ctx, Workspace& ws) const {
    const Index n = q.rows(), length = ctx.key_length;
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    std::int32_t* order = saved ? saved->order.data() : ws.take<std::int32_t>(config_.rounds * n);
    std::int32_t* bucket = saved ? saved->bucket.data() : ws.take<std::int32_t>(config_.rounds * n);
    // Rows combine rounds as one online softmax: running max m and sum z of exp(logit − m)
    // over every round's keys, out holding Σ exp(logit − m)·v until the final division.
    S* m = saved ? saved->max.data() : ws.take<S>(n);
    S* z = saved ? saved->log_sum.data() : ws.take<S>(n);
    hash_and_sort(k, length, ctx.head, order, bucket, ws);
    Rounds rounds = chunking(order, bucket, n, length, ctx.causal, ws);
    Chunk chunk(config_, scale(q.cols()), q, k, v, detail::lsh::inverse_norms(k, length, ws), ws);
    std::fill(m, m + n, -std::numeric_limits<S>::infinity());
    std::fill(z, z + n, S(0));
    out.setZero();
    const double pairs = forward_chunks(
        rounds, chunk, out, m, z, [](Index, Index) { return true; }, ws);
    for (Index t = 0; t < n; ++t) {
      if (z[t] > S(0)) out.row(t) *= S(1) / z[t];
      z[t] = z[t] > S(0) ? std::log(z[t]) : std::numeric_limits<S>::infinity();
    }
    record_work(pairs, double(length * config_.rounds * plan(n).columns()));
  }

  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    const Index n = q.rows(), length = ctx.key_length;
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    Rounds rounds = chunking(saved.order.data(), saved.bucket.data(), n, length, ctx.causal, ws);
    const S* inv_norm = detail::lsh::inverse_norms(k, length, ws);
    Chunk chunk(config_, scale(q.cols()), q, k, v, inv_norm, ws);
    S* delta = ws.take<S>(n);  // D_i = dO_i · O_i
    for (Index t = 0; t < length; ++t)
      delta[t] = d_out.row(t).dot(out.row(t));
    d_q.setZero();
    d_k.setZero();  // accumulates d k̂ first
    d_v.setZero();
    backward_chunks(
        rounds, chunk, d_out, delta, saved.max.data(), saved.log_sum.data(), d_q, d_k, d_v,
        [](Index, Index) { return true; }, ws);
    finish_gradients(k, inv_norm, length, d_q, d_k);
  }

  // The pieces of forward and backward, for mpi::ShardedLSH, which runs the chunks of each
  // round on the rank that holds them, on rows gathered from other ranks (Chunk::rows_from).

  using Rounds = detail::lsh::Chunking;
  using Chunk = detail::lsh::GatheredChunk<S>;

  /// Every round's chunks (n tokens, the first `length` valid): Workspace-backed.
  Rounds chunking(const std::int32_t* order, const std::int32_t* bucket, Index n, Index length,
                  bool causal, Workspace& ws) const {
    const Index chunks = detail::lsh::max_chunks(n, config_.chunk, plan(n).buckets);
    return Rounds(config_, chunks, order, bucket, n, length, causal, ws);
  }

  /// The first `columns` columns of the rotation of (head, round), into dst (d_k × columns).
  template <class Dst>
  void copy_rotation(Index head, Index round, Index columns, Dst&& dst) const {
    rotations_.copy(head, round, columns, dst);
  }

  /// Forward's chunk loop: for every round and every chunk ci with owns(round, ci), the
  /// chunk's queries run one step of the online softmax over their window, into their rows
  /// (chunk.row(t)) of out (Σ exp(logit − m)·v), m (running max) and z (running sum).
  /// Returns the query–key pairs computed.
  template <class AnyRounds, class Owns>
  double forward_chunks(AnyRounds& rounds, Chunk& chunk, View<S> out, S* m, S* z, Owns&& owns,
                        Workspace& ws) const {
    Workspace::Frame frame(ws);
    const Index c = chunk.qs.rows();
    auto o = ws.matrix<S>(c, out.cols());
    S* rescale = ws.take<S>(c);  // each chunk row's factor for out
    const bool prefetch = !chunk.gathers_rows();
    // A masked key gets probability 0, but 0 · ∞ or 0 · NaN in P·V would still reach the row:
    // when some value is not finite, rows add only the keys they see (probability ≠ 0).
    const bool exact_mask = !detail::all_finite(chunk.v_);
    double pairs = 0;
    for (Index round = 0; round < config_.rounds; ++round) {
      rounds.select(round);
      for (Index ci = 0; ci < rounds.chunks(); ++ci) {
        if (!owns(round, ci)) continue;
        const Index rows = chunk.logits(rounds, ci), q0 = rounds.first(ci);
        if (prefetch) detail::lsh::prefetch_rows(out, rounds.order, q0, q0 + rows, true);
        pairs += double(rows * chunk.keys);
        auto p = chunk.p.topLeftCorner(rows, chunk.keys);
        auto o_c = o.topRows(rows);
        for (Index a = 0; a < rows; ++a) {  // every row has its own key: max ≥ −1e5
          const Index r = chunk.row(rounds.order[q0 + a]);
          rescale[a] = detail::online_softmax_row(&p(a, 0), p.cols(), m[r], z[r]);
        }
        if (exact_mask) {
          o_c.setZero();
          for (Index a = 0; a < rows; ++a)
            for (Index b = 0; b < chunk.keys; ++b)
              if (p(a, b) != S(0)) o_c.row(a) += p(a, b) * chunk.vs.row(b);
        } else {
          chunk.mul.assign(o_c, p, chunk.vs.topRows(chunk.keys));
        }
        for (Index a = 0; a < rows; ++a) {
          auto row = out.row(chunk.row(rounds.order[q0 + a]));
          if (rescale[a] == S(1))
            row += o_c.row(a);
          else
            row = rescale[a] * row + o_c.row(a);
        }
      }
    }
    return pairs;
  }

  /// Backward's chunk loop over the chunks with owns(round, ci): adds to the rows
  /// (chunk.row(t)) of d_q the gradient of the unscaled queries' logits, of d_k that of the
  /// unit keys k̂, of d_v that of the values, from d_out, delta (dO·O), and each row's
  /// log-sum-exp as max and log_sum.
  template <class AnyRounds, class Owns>
  void backward_chunks(AnyRounds& rounds, Chunk& chunk, ConstView<S> d_out, const S* delta,
                       const S* max, const S* log_sum, View<S> d_q, View<S> d_k, View<S> d_v,
                       Owns&& owns, Workspace& ws) const {
    Workspace::Frame frame(ws);
    const Index dk = chunk.qs.cols(), dv = chunk.vs.cols(), c = chunk.qs.rows();
    const Index w = chunk.p.cols();
    const bool prefetch = !chunk.gathers_rows();
    auto d_o = ws.matrix<S>(c, dv);
    auto dp = ws.matrix<S>(c, w);
    auto d_vs = ws.matrix<S>(w, dv);
    auto d_qs = ws.matrix<S>(c, dk);
    auto d_ks = ws.matrix<S>(w, dk);
    for (Index round = 0; round < config_.rounds; ++round) {
      rounds.select(round);
      for (Index ci = 0; ci < rounds.chunks(); ++ci) {
        if (!owns(round, ci)) continue;
        const Index m = chunk.logits(rounds, ci), q0 = rounds.first(ci), keys = chunk.keys;
        // The rows this chunk's gradients are added to (its own tokens are new in the
        // window), and the next chunk's output gradients.
        if (prefetch) {
          for (const auto* grad : {&d_q, &d_k, &d_v})
            detail::lsh::prefetch_rows(*grad, rounds.order, q0, q0 + m, true);
          if (ci + 1 < rounds.chunks())
            detail::lsh::prefetch_rows(d_out, rounds.order, rounds.first(ci + 1),
                                       rounds.stop(ci + 1));
        }
        auto p = chunk.p.topLeftCorner(m, keys);
        for (Index a = 0; a < m; ++a) {
          const Index r = chunk.row(rounds.order[q0 + a]);
          d_o.row(a) = d_out.row(r);
          p.row(a).array() -= max[r];  // exp(logit − max − log_sum), max first
          detail::exp_shifted_sum(&p(a, 0), keys, log_sum[r]);
        }
        auto d_o_c = d_o.topRows(m);
        auto d_vs_c = d_vs.topRows(keys);
        chunk.mul.assign(d_vs_c, p.transpose(), d_o_c);
        auto dp_c = dp.topLeftCorner(m, keys);
        chunk.mul.assign(dp_c, d_o_c, chunk.vs.topRows(keys).transpose());
        for (Index a = 0; a < m; ++a) {
          const S da = delta[chunk.row(rounds.order[q0 + a])];
          dp_c.row(a) = (p.row(a).array() * (dp_c.row(a).array() - da)).matrix();
          dp_c(a, chunk.self[a]) = S(0);  // the self logit is a constant
        }
        auto d_qs_c = d_qs.topRows(m);
        chunk.mul.assign(d_qs_c, dp_c, chunk.ks.topRows(keys));
        auto d_ks_c = d_ks.topRows(keys);
        chunk.mul.assign(d_ks_c, dp_c.transpose(), chunk.qs.topRows(m));  // qs carries the scale
        for (Index a = 0; a < m; ++a)
          d_q.row(chunk.row(rounds.order[q0 + a])) += d_qs_c.row(a);
        for (Index b = 0; b < keys; ++b) {
          const Index r = chunk.row(chunk.token[b]);
          d_k.row(r) += d_ks_c.row(b);
          d_v.row(r) += d_vs_c.row(b);
        }
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
  void check_head_round(Index head, Index round) const {
    detail::require(head >= 0 && head < layout_.heads, "LSHAttention", "head", head,
                    detail::concat("a head in [0, ", layout_.heads, ")"));
    detail::require(round >= 0 && round < config_.rounds, "LSHAttention", "round", round,
                    detail::concat("a round in [0, ", config_.rounds, ")"));
  }

  // Buckets of every round (padding: the extra bucket b), then the (bucket, position) order.
  void hash_and_sort(ConstView<S> k, Index length, Index head, std::int32_t* order,
                     std::int32_t* bucket, Workspace& ws) const {
    Workspace::Frame frame(ws);
    const Index n = k.rows(), r = config_.rounds;
    const BucketPlan bp = plan(n);
    detail::lsh::hash_keys<S>(
        k, length, r, bp,
        [&](Index round, Index columns, auto&& dst) { copy_rotation(head, round, columns, dst); },
        bucket, ws);
    Index* count = ws.take<Index>(bp.buckets + 2);
    for (Index round = 0; round < r; ++round)
      detail::lsh::sort_by_bucket(bucket + round * n, n, length, bp.buckets, order + round * n,
                                  count);
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

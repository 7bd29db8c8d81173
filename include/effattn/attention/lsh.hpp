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

#include "effattn/core/concepts.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/head.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/rng.hpp"
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

  struct Config {
    Index chunk = 64;               ///< tokens per chunk (c)
    Index rounds = 4;               ///< hash rounds (r)
    Index buckets = 0;              ///< even bucket count; 0: about 2n/c per call
    Index look_back = 1;            ///< chunks before a query's own that it sees
    Index look_forward = 0;         ///< chunks after it that it sees
    bool same_bucket = false;       ///< also mask keys of other buckets (the paper's formulation)
    bool dedup = false;             ///< subtract log(rounds in which a pair may attend) from logits
    std::optional<double> scale{};  ///< logit scale; default 1/√d_k (trax, Hugging Face)
  };

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

  /// b buckets as b1 · b2 (b2 = 1: one argmax over b/2 columns).
  struct BucketPlan {
    Index buckets, first, second;
    Index columns() const { return first / 2 + (second > 1 ? second / 2 : 0); }
  };

  LSHAttention() : LSHAttention(Config{}, HeadLayout{}) {}
  LSHAttention(Config config, HeadLayout layout) : config_(config), layout_(layout) {
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
    redraw(layout_.seed);
  }

  const Config& config() const { return config_; }
  S scale(Index d_k) const {
    return static_cast<S>(config_.scale ? *config_.scale : 1.0 / std::sqrt(double(d_k)));
  }

  /// The buckets a sequence of n tokens is hashed into.
  BucketPlan plan(Index n) const {
    Index b = config_.buckets;
    if (b == 0) {
      const Index target = std::max<Index>(2, 2 * ((n + config_.chunk - 1) / config_.chunk));
      if (target <= max_unfactored) return {target, target, 1};
      const Index b1 = even_at_least(Index(std::ceil(std::sqrt(double(target)))));
      const Index b2 = even_at_least((target + b1 - 1) / b1);
      return {b1 * b2, b1, b2};
    }
    if (b > max_unfactored)
      for (Index b1 = Index(std::sqrt(double(b))) / 2 * 2; b1 >= 2; b1 -= 2)
        if (b % b1 == 0 && (b / b1) % 2 == 0) return {b, b1, b / b1};
    return {b, b, 1};
  }

  /// Draws every rotation anew from `seed` (fixed ones are dropped too).
  void redraw(std::uint64_t seed) {
    const std::lock_guard<std::mutex> lock(rotations_lock_.mutex);
    seed_ = seed;
    rotations_.assign(static_cast<std::size_t>(layout_.heads * config_.rounds), Rotation{});
  }

  /// The first `columns` columns of the rotation of (head, round): d_k × columns.
  Matrix<S> rotation(Index head, Index round, Index columns) const {
    check_head_round(head, round);
    Matrix<S> r(layout_.d_key, columns);
    copy_rotation(head, round, columns, r);
    return r;
  }
  /// Fixes the rotation of (head, round) to r (d_k × w): calls that need at most w columns
  /// use its first ones; needing more is an effattn::Error.
  void set_rotation(Index head, Index round, const Matrix<S>& r) {
    check_head_round(head, round);
    detail::require(r.rows() == layout_.d_key && r.cols() > 0, "LSHAttention", "rotation",
                    detail::concat("a ", r.rows(), "×", r.cols(), " matrix"),
                    detail::concat("d_k = ", layout_.d_key, " rows and at least one column"));
    const std::lock_guard<std::mutex> lock(rotations_lock_.mutex);
    rotations_[index_of(head, round)] = Rotation{r, true};
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
    const std::lock_guard<std::mutex> lock(rotations_lock_.mutex);
    for (std::size_t i = 0; i < rotations_.size(); ++i)
      detail::require(
          !rotations_[i].fixed || rotations_[i].matrix.cols() >= columns, who, "rotation",
          detail::concat("head ", Index(i) / config_.rounds, " round ", Index(i) % config_.rounds,
                         " fixed at ", rotations_[i].matrix.cols(), " columns"),
          detail::concat("at least ", columns, " columns for ", plan(n_q).buckets,
                         " buckets at n = ", n_q));
    // The call is being planned: draw the columns it needs now, so that the kernels only
    // read rotations (no drawing, no allocation inside the parallel region).
    for (std::size_t i = 0; i < rotations_.size(); ++i)
      grow_rotation(rotations_[i], i, columns);
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

  std::size_t scratch_bytes(Index n_q, Index /*n_k*/, Index d_k, Index d_v) const {
    using W = Workspace;
    const Index n = n_q, r = config_.rounds, c = std::min(config_.chunk, n), w = window(n);
    const BucketPlan bp = plan(n);
    const std::size_t ints = W::bytes_for<std::int32_t>(r * n), scalars = W::bytes_for<S>(n);
    const std::size_t starts = W::bytes_for<std::int32_t>(max_chunks(n, bp) + 1);
    // 1/‖k‖, chunk boundaries, chunk of every token (dedup) and a chunk's gathered rows.
    const std::size_t common =
        scalars + starts + (config_.dedup ? ints + r * starts : 0) + Chunk::bytes(c, w, d_k, d_v);
    const std::size_t hashing = W::bytes_for<S>(d_k * r * bp.columns()) +
                                W::bytes_for<S>(std::min(hash_rows, n) * r * bp.columns()) +
                                W::bytes_for<Index>(bp.buckets + 2);
    // Forward: order, buckets and log-sum-exp (when not saved), then hashing or the chunks.
    const std::size_t fwd =
        2 * ints + 2 * scalars + std::max(hashing, common + W::bytes_for<S>(c * d_v));
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
    Rounds rounds(*this, order, bucket, n, length, ctx.causal, ws);
    Chunk chunk(*this, q, k, v, rounds.inverse_norms(k, ws), ws);
    auto o = ws.matrix<S>(std::min(config_.chunk, n), v.cols());

    constexpr S neg_inf = -std::numeric_limits<S>::infinity();
    std::fill(m, m + n, neg_inf);
    std::fill(z, z + n, S(0));
    out.setZero();
    double pairs = 0;
    for (Index round = 0; round < config_.rounds; ++round) {
      rounds.select(round);
      for (Index ci = 0; ci < rounds.chunks(); ++ci) {
        const Index rows = chunk.logits(rounds, ci), q0 = rounds.first(ci);
        pairs += double(rows * chunk.keys);
        auto p = chunk.p.topLeftCorner(rows, chunk.keys);
        auto o_c = o.topRows(rows);
        S* row_max = chunk.row_max;
        for (Index a = 0; a < rows; ++a) {  // every row has its own key: max ≥ −1e5
          const Index t = rounds.order[q0 + a];
          const S row = p.row(a).template maxCoeff<Eigen::PropagateNaN>();
          row_max[a] = std::max(row, m[t]);
          if (std::isnan(row)) row_max[a] = row;
          const S sum = detail::exp_shifted_sum(&p(a, 0), p.cols(), row_max[a]);
          const S rescale = m[t] == neg_inf ? S(0) : std::exp(m[t] - row_max[a]);
          z[t] = rescale * z[t] + sum;
          if (rescale != S(1)) out.row(t) *= rescale;
          m[t] = row_max[a];
        }
        o_c.noalias() = p * chunk.vs.topRows(chunk.keys);
        for (Index a = 0; a < rows; ++a)
          out.row(rounds.order[q0 + a]) += o_c.row(a);
      }
    }
    for (Index t = 0; t < n; ++t) {
      if (z[t] > S(0)) out.row(t) *= S(1) / z[t];
      z[t] = z[t] > S(0) ? std::log(z[t]) : std::numeric_limits<S>::infinity();
    }
    const std::lock_guard<std::mutex> lock(work_lock_.mutex);
    work_.pairs += pairs;
    work_.hashed_columns += double(length * config_.rounds * plan(n).columns());
  }

  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    const Index n = q.rows(), length = ctx.key_length;
    const Index dk = q.cols(), dv = v.cols(), c = std::min(config_.chunk, n);
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    Rounds rounds(*this, saved.order.data(), saved.bucket.data(), n, length, ctx.causal, ws);
    const S* inv_norm = rounds.inverse_norms(k, ws);
    Chunk chunk(*this, q, k, v, inv_norm, ws);
    S* delta = ws.take<S>(n);  // D_i = dO_i · O_i
    for (Index t = 0; t < length; ++t)
      delta[t] = d_out.row(t).dot(out.row(t));
    const Index w = chunk.p.cols();
    auto d_o = ws.matrix<S>(c, dv);
    auto dp = ws.matrix<S>(c, w);
    auto d_vs = ws.matrix<S>(w, dv);
    auto d_qs = ws.matrix<S>(c, dk);
    auto d_ks = ws.matrix<S>(w, dk);
    d_q.setZero();
    d_k.setZero();  // accumulates d k̂ first
    d_v.setZero();

    for (Index round = 0; round < config_.rounds; ++round) {
      rounds.select(round);
      for (Index ci = 0; ci < rounds.chunks(); ++ci) {
        const Index m = chunk.logits(rounds, ci), q0 = rounds.first(ci), keys = chunk.keys;
        auto p = chunk.p.topLeftCorner(m, keys);
        for (Index a = 0; a < m; ++a) {
          const Index t = rounds.order[q0 + a];
          d_o.row(a) = d_out.row(t);
          p.row(a).array() -= saved.max[t];  // exp(logit − max − log_sum), max first
          detail::exp_shifted_sum(&p(a, 0), keys, saved.log_sum[t]);
        }
        auto d_o_c = d_o.topRows(m);
        auto d_vs_c = d_vs.topRows(keys);
        d_vs_c.noalias() = p.transpose() * d_o_c;
        auto dp_c = dp.topLeftCorner(m, keys);
        dp_c.noalias() = d_o_c * chunk.vs.topRows(keys).transpose();
        for (Index a = 0; a < m; ++a) {
          const S da = delta[rounds.order[q0 + a]];
          dp_c.row(a) = (p.row(a).array() * (dp_c.row(a).array() - da)).matrix();
          dp_c(a, chunk.self[a]) = S(0);  // the self logit is a constant
        }
        auto d_qs_c = d_qs.topRows(m);
        d_qs_c.noalias() = dp_c * chunk.ks.topRows(keys);
        auto d_ks_c = d_ks.topRows(keys);
        d_ks_c.noalias() = dp_c.transpose() * chunk.qs.topRows(m);  // qs carries the scale
        for (Index a = 0; a < m; ++a)
          d_q.row(rounds.order[q0 + a]) += d_qs_c.row(a);
        for (Index b = 0; b < keys; ++b) {
          d_k.row(chunk.token[b]) += d_ks_c.row(b);
          d_v.row(chunk.token[b]) += d_vs_c.row(b);
        }
      }
    }
    d_q *= scale(dk);
    for (Index t = 0; t < length; ++t) {  // through k̂ = k/‖k‖: (I − k̂k̂ᵀ) d k̂ / ‖k‖
      const S inv = inv_norm[t];
      const S along = inv * k.row(t).dot(d_k.row(t));
      d_k.row(t) = inv * (d_k.row(t) - along * inv * k.row(t));
    }
  }

 private:
  static constexpr Index max_unfactored = 128;  // buckets hashed with one argmax
  static constexpr Index hash_rows = 256;       // tokens hashed per product
  static constexpr S self_logit = S(-1e5);      // ALGORITHMS.md §4: not −∞

  static Index even_at_least(Index x) { return std::max<Index>(2, (x + 1) / 2 * 2); }

  struct Rotation {
    Matrix<S> matrix;  // d_k × columns drawn so far, or the fixed rotation
    bool fixed = false;
  };

  std::size_t index_of(Index head, Index round) const {
    return static_cast<std::size_t>(head * config_.rounds + round);
  }
  void check_head_round(Index head, Index round) const {
    detail::require(head >= 0 && head < layout_.heads, "LSHAttention", "head", head,
                    detail::concat("a head in [0, ", layout_.heads, ")"));
    detail::require(round >= 0 && round < config_.rounds, "LSHAttention", "round", round,
                    detail::concat("a round in [0, ", config_.rounds, ")"));
  }

  // Copies the first `columns` columns of (head, round)'s rotation into dst, drawing the
  // columns not drawn yet: element (i, j) is normal number j·d_k + i of the stream.
  template <class Dst>
  void copy_rotation(Index head, Index round, Index columns, Dst&& dst) const {
    if (columns == 0) return;  // one bucket: nothing to hash with
    const std::lock_guard<std::mutex> lock(rotations_lock_.mutex);
    Rotation& rot = rotations_[index_of(head, round)];
    grow_rotation(rot, index_of(head, round), columns);  // validate() drew them already
    dst = rot.matrix.leftCols(columns);
  }

  // Draws the columns of a rotation not drawn yet (caller holds rotations_lock_).
  void grow_rotation(Rotation& rot, std::size_t index, Index columns) const {
    if (rot.fixed || rot.matrix.cols() >= columns) return;
    const Index d = layout_.d_key, old = rot.matrix.cols();
    Matrix<S> grown(d, columns);
    if (old > 0) grown.leftCols(old) = rot.matrix;
    const CounterRng rng(seed_, 0x4c534800ull + index);
    for (Index j = old; j < columns; ++j)
      for (Index i = 0; i < d; ++i)
        grown(i, j) = static_cast<S>(rng.normal(std::uint64_t(j * d + i)));
    rot.matrix = std::move(grown);
  }

  // argmax over [x ; −x] for x of `half` values: in [0, 2·half).
  static Index angular_argmax(const S* x, Index half) {
    Index hi = 0, lo = 0;
    for (Index j = 1; j < half; ++j) {
      if (x[j] > x[hi]) hi = j;
      if (x[j] < x[lo]) lo = j;
    }
    return x[hi] >= -x[lo] ? hi : half + lo;
  }

  // Buckets of every round (padding: the extra bucket b), then the (bucket, position) order.
  void hash_and_sort(ConstView<S> k, Index length, Index head, std::int32_t* order,
                     std::int32_t* bucket, Workspace& ws) const {
    Workspace::Frame frame(ws);
    const Index n = k.rows(), r = config_.rounds;
    const BucketPlan bp = plan(n);
    const Index cols = bp.columns();
    auto rot = ws.matrix<S>(k.cols(), r * cols);
    for (Index round = 0; round < r; ++round)
      copy_rotation(head, round, cols, rot.middleCols(round * cols, cols));
    auto proj = ws.matrix<S>(std::min(hash_rows, std::max<Index>(length, 1)), r * cols);
    for (Index t0 = 0; t0 < length; t0 += hash_rows) {
      const Index rows = std::min(hash_rows, length - t0);
      if (bp.buckets == 1) {  // no hashing
        for (Index round = 0; round < r; ++round)
          std::fill(bucket + round * n + t0, bucket + round * n + t0 + rows, 0);
        continue;
      }
      proj.topRows(rows).noalias() = k.middleRows(t0, rows) * rot;
      for (Index i = 0; i < rows; ++i)
        for (Index round = 0; round < r; ++round) {
          const S* x = &proj(i, round * cols);
          Index h = angular_argmax(x, bp.first / 2);
          if (bp.second > 1) h += bp.first * angular_argmax(x + bp.first / 2, bp.second / 2);
          bucket[round * n + t0 + i] = static_cast<std::int32_t>(h);
        }
    }
    Index* count = ws.take<Index>(bp.buckets + 2);
    for (Index round = 0; round < r; ++round) {
      std::int32_t* b = bucket + round * n;
      std::fill(b + length, b + n, static_cast<std::int32_t>(bp.buckets));
      std::fill(count, count + bp.buckets + 2, Index(0));
      for (Index t = 0; t < n; ++t)
        ++count[b[t] + 1];
      for (Index i = 1; i < bp.buckets + 2; ++i)
        count[i] += count[i - 1];
      for (Index t = 0; t < n; ++t)  // positions ascending: the sort is stable
        order[round * n + count[b[t]]++] = static_cast<std::int32_t>(t);
    }
  }

  // Most keys a query chunk sees, and most chunks a round has (causal chunks stop at
  // bucket boundaries, so each bucket may add one).
  Index window(Index n) const {
    return std::min(n, (config_.look_back + 1 + config_.look_forward) * config_.chunk);
  }
  Index max_chunks(Index n, const BucketPlan& bp) const {
    return (n + config_.chunk - 1) / config_.chunk + bp.buckets;
  }

  // The chunks of every round. Bidirectional (the paper): the sorted valid tokens cut every
  // `chunk` rows, windows wrap around. Causal: chunks are cut within each bucket and a
  // window stays in its bucket, so which keys a query sees depends on earlier tokens only
  // (with global chunks, a later token's bucket would shift chunk boundaries).
  class Rounds {
   public:
    Rounds(const LSHAttention& policy, const std::int32_t* all_order,
           const std::int32_t* all_bucket, Index n, Index length, bool causal, Workspace& ws)
        : policy_(policy),
          all_order_(all_order),
          all_bucket_(all_bucket),
          n_(n),
          length_(length),
          local_(causal),
          start_(ws.take<std::int32_t>(policy.max_chunks(n, policy.plan(n)) + 1)) {
      if (!policy_.config_.dedup) return;
      const Index r = policy_.config_.rounds;
      chunk_of_ = ws.take<std::int32_t>(r * n);
      for (Index round = 0; round < r; ++round) {
        select(round);
        for (Index ci = 0; ci < chunks_; ++ci)
          for (Index s = start_[ci]; s < start_[ci + 1]; ++s)
            chunk_of_[round * n + order[s]] = static_cast<std::int32_t>(ci);
        global_chunks_ = chunks_;
      }
    }

    /// Cuts round `round` into chunks.
    void select(Index round) {
      order = all_order_ + round * n_;
      bucket = all_bucket_ + round * n_;
      const Index c = policy_.config_.chunk;
      chunks_ = 0;
      for (Index s = 0; s < length_; ++s) {
        const bool new_bucket = local_ && s > 0 && bucket[order[s]] != bucket[order[s - 1]];
        if (s == 0 || new_bucket || s - start_[chunks_ - 1] == c)
          start_[chunks_++] = static_cast<std::int32_t>(s);
      }
      start_[chunks_] = static_cast<std::int32_t>(length_);
    }

    Index chunks() const { return chunks_; }
    Index first(Index ci) const { return start_[ci]; }
    Index stop(Index ci) const { return start_[ci + 1]; }
    Index length() const { return length_; }
    bool causal() const { return local_; }

    /// Calls f(first, stop) for the sorted rows of each chunk a query of chunk ci sees,
    /// each chunk once.
    template <class F>
    void for_each_window_chunk(Index ci, F&& f) const {
      const auto& cfg = policy_.config_;
      if (local_) {
        const std::int32_t b = bucket[order[start_[ci]]];
        for (Index cj = std::max<Index>(0, ci - cfg.look_back);
             cj <= std::min(chunks_ - 1, ci + cfg.look_forward); ++cj)
          if (bucket[order[start_[cj]]] == b) f(first(cj), stop(cj));
        return;
      }
      if (cfg.look_back + 1 + cfg.look_forward >= chunks_) {
        for (Index cj = 0; cj < chunks_; ++cj)
          f(first(cj), stop(cj));
        return;
      }
      for (Index o = -cfg.look_back; o <= cfg.look_forward; ++o) {
        const Index cj = ((ci + o) % chunks_ + chunks_) % chunks_;
        f(first(cj), stop(cj));
      }
    }

    /// Rounds in which query i may attend to key j (dedup): j in i's window, and in its
    /// bucket when that is required.
    Index shared_rounds(Index i, Index j) const {
      const auto& cfg = policy_.config_;
      Index count = 0;
      for (Index round = 0; round < cfg.rounds; ++round) {
        const std::int32_t* b = all_bucket_ + round * n_;
        const std::int32_t* ch = chunk_of_ + round * n_;
        const bool same = b[i] == b[j];
        if ((cfg.same_bucket || local_) && !same) continue;
        const Index diff = ch[j] - ch[i];
        if (local_)
          count += diff >= -cfg.look_back && diff <= cfg.look_forward;
        else if (cfg.look_back + 1 + cfg.look_forward >= global_chunks_)
          ++count;
        else {
          const Index wrapped = (diff % global_chunks_ + global_chunks_) % global_chunks_;
          count += wrapped <= cfg.look_forward || wrapped >= global_chunks_ - cfg.look_back;
        }
      }
      return count;
    }
    bool dedup() const { return chunk_of_ != nullptr; }

    S* inverse_norms(ConstView<S> k, Workspace& ws) const {
      S* inv = ws.take<S>(k.rows());
      for (Index t = 0; t < k.rows(); ++t) {
        const S norm = t < length_ ? k.row(t).norm() : S(0);
        inv[t] = norm > S(0) ? S(1) / norm : S(0);
      }
      return inv;
    }

    const std::int32_t* order = nullptr;   // this round: tokens in sorted order
    const std::int32_t* bucket = nullptr;  // this round: bucket of each token

   private:
    const LSHAttention& policy_;
    const std::int32_t* all_order_;
    const std::int32_t* all_bucket_;
    Index n_, length_;
    bool local_;
    std::int32_t* start_;
    std::int32_t* chunk_of_ = nullptr;  // rounds × n (dedup only)
    Index chunks_ = 0, global_chunks_ = 0;
  };

  // A query chunk's gathered queries, keys and values, and its masked logits.
  struct Chunk {
    Chunk(const LSHAttention& policy, ConstView<S> q, ConstView<S> k, ConstView<S> v,
          const S* inv_norm, Workspace& ws)
        : policy_(policy),
          q_(q),
          k_(k),
          v_(v),
          inv_norm_(inv_norm),
          rows_(std::min(policy.config_.chunk, q.rows())),
          width_(policy.window(q.rows())),
          qs(ws.matrix<S>(rows_, q.cols())),
          ks(ws.matrix<S>(width_, k.cols())),
          vs(ws.matrix<S>(width_, v.cols())),
          p(ws.matrix<S>(rows_, width_)),
          token(ws.take<std::int32_t>(width_)),
          self(ws.take<std::int32_t>(rows_)),
          row_max(ws.take<S>(rows_)) {}

    // What the constructor takes from a workspace.
    static std::size_t bytes(Index c, Index w, Index d_k, Index d_v) {
      using W = Workspace;
      return W::bytes_for<S>(c * d_k) + W::bytes_for<S>(w * d_k) + W::bytes_for<S>(w * d_v) +
             W::bytes_for<S>(c * w) + W::bytes_for<std::int32_t>(w) +
             W::bytes_for<std::int32_t>(c) + W::bytes_for<S>(c);
    }

    // Gathers the queries of chunk ci and the keys of its window, and writes their masked
    // logits to p (rows × keys). Returns the row count.
    Index logits(const Rounds& rounds, Index ci) {
      const auto& cfg = policy_.config_;
      const Index q0 = rounds.first(ci), m = rounds.stop(ci) - q0;
      const S s = policy_.scale(q_.cols());
      for (Index a = 0; a < m; ++a)
        qs.row(a) = s * q_.row(rounds.order[q0 + a]);
      keys = 0;
      Index own = 0;
      rounds.for_each_window_chunk(ci, [&](Index first, Index stop) {
        if (first == q0) own = keys;
        for (Index j = first; j < stop; ++j) {
          const Index t = rounds.order[j];
          token[keys] = static_cast<std::int32_t>(t);
          ks.row(keys) = inv_norm_[t] * k_.row(t);
          vs.row(keys) = v_.row(t);
          ++keys;
        }
      });
      auto pm = p.topLeftCorner(m, keys);
      pm.noalias() = qs.topRows(m) * ks.topRows(keys).transpose();
      constexpr S neg_inf = -std::numeric_limits<S>::infinity();
      for (Index a = 0; a < m; ++a) {
        const std::int32_t i = rounds.order[q0 + a];
        S* row = &p(a, 0);
        if (rounds.causal())
          for (Index b = 0; b < keys; ++b)
            row[b] = token[b] > i ? neg_inf : row[b];
        if (cfg.same_bucket && !rounds.causal()) {  // causal windows are one bucket already
          const std::int32_t bi = rounds.bucket[i];
          for (Index b = 0; b < keys; ++b)
            row[b] = rounds.bucket[token[b]] != bi ? neg_inf : row[b];
        }
        if (rounds.dedup())
          for (Index b = 0; b < keys; ++b)
            if (row[b] != neg_inf) row[b] -= std::log(S(rounds.shared_rounds(i, token[b])));
        self[a] = static_cast<std::int32_t>(own + a);
        row[own + a] = self_logit;
      }
      return m;
    }

    const LSHAttention& policy_;
    ConstView<S> q_, k_, v_;
    const S* inv_norm_;
    Index rows_, width_;
    Eigen::Map<Matrix<S>, Eigen::Aligned64> qs, ks, vs, p;  // queries (scaled), keys, values
    std::int32_t* token;  // original position of each gathered key
    std::int32_t* self;   // column of each row's own key
    S* row_max;
    Index keys = 0;
  };

  Config config_;
  HeadLayout layout_;
  std::uint64_t seed_ = 0;
  mutable std::vector<Rotation> rotations_;
  mutable detail::CopyableMutex rotations_lock_;
  mutable Work work_;
  mutable detail::CopyableMutex work_lock_;
};

static_assert(AttentionPolicy<LSHAttention<float>>);
static_assert(AttentionPolicy<LSHAttention<double>>);

}  // namespace effattn

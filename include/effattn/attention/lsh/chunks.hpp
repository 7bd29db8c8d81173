#pragma once
// LSH attention's chunks: each hash round's sorted order cut into chunks (Chunking), and a
// query chunk's gathered queries, keys and values with their masked logits (GatheredChunk).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "effattn/attention/lsh/lsh_config.hpp"
#include "effattn/core/packed_product.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail::lsh {

/// The logit of a token with itself (docs/algorithms.md §4: not −∞, so a row that may see only
/// itself still has a softmax).
template <class S>
inline constexpr S self_logit = S(-1e5);

/// Most chunks a round of n tokens has with b buckets (causal chunks stop at bucket
/// boundaries, so each bucket may add one; a chunk has at least one token).
inline Index max_chunks(Index n, Index chunk, Index buckets) {
  return std::min(n, (n + chunk - 1) / chunk + buckets);
}

/// inv[t] = 1/‖k_t‖ for rows [t0, t1) of k, the first `length` valid (0 for a zero row and for
/// padding).
template <class S>
void inverse_norms(ConstView<S> k, Index length, Index t0, Index t1, S* inv) {
  for (Index t = t0; t < t1; ++t) {
    const S norm = t < length ? k.row(t).norm() : S(0);
    inv[t] = norm > S(0) ? S(1) / norm : S(0);
  }
}
/// The same for every row, into the workspace.
template <class S>
S* inverse_norms(ConstView<S> k, Index length, Workspace& ws) {
  S* inv = ws.take<S>(k.rows());
  inverse_norms(k, length, 0, k.rows(), inv);
  return inv;
}

/// Asks the cache for rows order[first … stop) of m: a chunk's rows are scattered over the
/// sequence, so their loads are requested one chunk ahead, while the current chunk computes.
template <class M>
void prefetch_rows(const M& m, const std::int32_t* order, Index first, Index stop,
                   bool for_write = false) {
#if defined(__GNUC__)
  constexpr Index line = 64;
  const Index bytes = m.cols() * Index(sizeof(typename M::Scalar));
  for (Index j = first; j < stop; ++j) {
    const char* row = reinterpret_cast<const char*>(m.data() + order[j] * m.outerStride());
    for (Index b = 0; b < bytes; b += line)
      if (for_write)
        __builtin_prefetch(row + b, 1, 2);
      else
        __builtin_prefetch(row + b, 0, 2);
  }
#else
  (void)m, (void)order, (void)first, (void)stop, (void)for_write;
#endif
}

/// Whether a query of chunk ci sees chunk ci + diff, in a round of `chunks` chunks (both in one
/// bucket when causal; then the window does not wrap around).
inline bool window_sees(const LSHConfig& cfg, bool causal, Index diff, Index chunks) {
  if (causal) return diff >= -cfg.look_back && diff <= cfg.look_forward;
  if (cfg.look_back + 1 + cfg.look_forward >= chunks) return true;
  const Index wrapped = (diff % chunks + chunks) % chunks;
  return wrapped <= cfg.look_forward || wrapped >= chunks - cfg.look_back;
}

/// Every round's sorted order cut into chunks. A round is cut once (cut(round): its chunk
/// starts, and with dedup each token's chunk) into storage the tasks of a call share;
/// select(round) then only points at the round's cuts, so any task may read any round.
class Chunking {
 public:
  /// Where the cuts live: each round's chunk starts (max_chunks + 1 each), chunk count, and with
  /// dedup each token's chunk (n each).
  static Index storage_ints(const LSHConfig& config, Index max_chunks, Index n) {
    return config.rounds * (max_chunks + 2) + (config.dedup ? config.rounds * n : 0);
  }

  /// Rounds of `all_order` and `all_bucket` (rounds × n each), the first `length` tokens
  /// valid, with `max_chunks` bounding the chunks of one round; `storage` holds
  /// storage_ints(config, max_chunks, n) entries.
  Chunking(const LSHConfig& config, Index max_chunks, const std::int32_t* all_order,
           const std::int32_t* all_bucket, Index n, Index length, bool causal,
           std::int32_t* storage)
      : config_(config),
        all_order_(all_order),
        all_bucket_(all_bucket),
        n_(n),
        length_(length),
        max_chunks_(max_chunks),
        local_(causal),
        starts_(storage),
        counts_(storage + config.rounds * (max_chunks + 1)),
        chunk_of_(config.dedup ? counts_ + config.rounds : nullptr) {}

  /// Cuts round `round` into chunks (and selects it).
  void cut(Index round) {
    select(round);
    std::int32_t* start = starts_ + round * (max_chunks_ + 1);
    const Index c = config_.chunk;
    Index chunks = 0;
    for (Index s = 0; s < length_; ++s) {
      const bool new_bucket = local_ && s > 0 && bucket[order[s]] != bucket[order[s - 1]];
      if (s == 0 || new_bucket || s - start[chunks - 1] == c)
        start[chunks++] = static_cast<std::int32_t>(s);
    }
    start[chunks] = static_cast<std::int32_t>(length_);
    counts_[round] = static_cast<std::int32_t>(chunks);
    if (chunk_of_)
      for (Index ci = 0; ci < chunks; ++ci)
        for (Index s = start[ci]; s < start[ci + 1]; ++s)
          chunk_of_[round * n_ + order[s]] = static_cast<std::int32_t>(ci);
    select(round);
  }

  /// Points at round `round`, cut before.
  void select(Index round) {
    order = all_order_ + round * n_;
    bucket = all_bucket_ + round * n_;
    start_ = starts_ + round * (max_chunks_ + 1);
    chunks_ = counts_[round];
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
    const LSHConfig& cfg = config_;
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
  /// bucket when that is required. Needs every round cut.
  Index shared_rounds(Index i, Index j) const {
    const LSHConfig& cfg = config_;
    Index count = 0;
    for (Index round = 0; round < cfg.rounds; ++round) {
      const std::int32_t* b = all_bucket_ + round * n_;
      const std::int32_t* ch = chunk_of_ + round * n_;
      const bool same = b[i] == b[j];
      if ((cfg.same_bucket || local_) && !same) continue;
      count += window_sees(cfg, local_, ch[j] - ch[i], counts_[round]);
    }
    return count;
  }
  bool dedup() const { return chunk_of_ != nullptr; }

  const std::int32_t* order = nullptr;   // this round: tokens in sorted order
  const std::int32_t* bucket = nullptr;  // this round: bucket of each token

 private:
  const LSHConfig& config_;
  const std::int32_t* all_order_;
  const std::int32_t* all_bucket_;
  Index n_, length_, max_chunks_;
  bool local_;
  std::int32_t* starts_;    // rounds × (max_chunks + 1)
  std::int32_t* counts_;    // rounds
  std::int32_t* chunk_of_;  // rounds × n (dedup only)
  const std::int32_t* start_ = nullptr;
  Index chunks_ = 0;
};

/// A query chunk's gathered queries, keys and values, and its masked logits.
template <class S>
struct GatheredChunk {
  /// Gathers from q (queries), k (keys, scaled by inv_norm to unit length) and v, with
  /// `scale` on the logits.
  GatheredChunk(const LSHConfig& config, S scale, ConstView<S> q, ConstView<S> k, ConstView<S> v,
                const S* inv_norm, Workspace& ws)
      : config_(config),
        scale_(scale),
        q_(q),
        k_(k),
        v_(v),
        inv_norm_(inv_norm),
        rows_(std::min(config.chunk, q.rows())),
        width_(config.window(q.rows())),
        qs(ws.matrix<S>(rows_, q.cols())),
        ks(ws.matrix<S>(width_, k.cols())),
        vs(ws.matrix<S>(width_, v.cols())),
        p(ws.matrix<S>(rows_, width_)),
        token(ws.take<std::int32_t>(width_)),
        self(ws.take<std::int32_t>(rows_)),
        mul(ws, products_capacity(rows_, width_, q.cols(), v.cols())) {}

  // What the constructor takes from a workspace.
  static std::size_t bytes(Index c, Index w, Index d_k, Index d_v) {
    using W = Workspace;
    return W::bytes_for<S>(c * d_k) + W::bytes_for<S>(w * d_k) + W::bytes_for<S>(w * d_v) +
           W::bytes_for<S>(c * w) + W::bytes_for<std::int32_t>(w) + W::bytes_for<std::int32_t>(c) +
           Products<S>::bytes(products_capacity(c, w, d_k, d_v));
  }
  // The largest operand b the chunk's products pack: ksᵀ or vsᵀ (d × w), vs or ks (w × d), and
  // backward's query-side rows (c × d, c ≤ w).
  static Index products_capacity(Index c, Index w, Index d_k, Index d_v) {
    const Index d = std::max(d_k, d_v);
    return std::max(
        {Products<S>::capacity(d, w), Products<S>::capacity(w, d), Products<S>::capacity(c, d)});
  }

  /// Rows of q, k, v (and inv_norm) hold the tokens of `row_of` (row of token t: row_of[t]),
  /// not the whole sequence in order: what a sequence-parallel engine gathers from ranks.
  void rows_from(const std::int32_t* row_of) { row_of_ = row_of; }
  /// The row of q, k, v holding token t.
  Index row(Index t) const { return row_of_ ? Index(row_of_[t]) : t; }
  bool gathers_rows() const { return row_of_ != nullptr; }

  // Gathers the queries of chunk ci and the keys of its window, and writes their masked
  // logits to p (rows × keys). Returns the row count. Rounds: Chunking, or what has its
  // interface (mpi::ShardedLSH's chunks of one rank).
  template <class Rounds>
  Index logits(const Rounds& rounds, Index ci) {
    const LSHConfig& cfg = config_;
    const Index q0 = rounds.first(ci), m = rounds.stop(ci) - q0;
    const S s = scale_;
    for (Index a = 0; a < m; ++a)
      qs.row(a) = s * q_.row(row(rounds.order[q0 + a]));
    keys = 0;
    Index own = 0;
    rounds.for_each_window_chunk(ci, [&](Index first, Index stop) {
      if (first == q0) own = keys;
      for (Index j = first; j < stop; ++j) {
        const Index t = rounds.order[j], r = row(t);
        token[keys] = static_cast<std::int32_t>(t);
        ks.row(keys) = inv_norm_[r] * k_.row(r);
        vs.row(keys) = v_.row(r);
        ++keys;
      }
    });
    if (!row_of_ && ci + 1 < rounds.chunks()) {  // the next chunk's rows: its queries, new keys
      const Index next = rounds.first(ci + 1), end = rounds.stop(ci + 1);
      prefetch_rows(q_, rounds.order, next, end);
      prefetch_rows(k_, rounds.order, next, end);
      prefetch_rows(v_, rounds.order, next, end);
    }
    auto pm = p.topLeftCorner(m, keys);
    mul.assign(pm, qs.topRows(m), ks.topRows(keys).transpose());
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
      row[own + a] = self_logit<S>;
    }
    return m;
  }

  const LSHConfig& config_;
  S scale_;
  ConstView<S> q_, k_, v_;
  const S* inv_norm_;
  Index rows_, width_;
  Eigen::Map<Matrix<S>, Eigen::Aligned64> qs, ks, vs, p;  // queries (scaled), keys, values
  std::int32_t* token;                                    // original position of each gathered key
  std::int32_t* self;                                     // column of each row's own key
  Products<S> mul;  // the chunk's products (and the policy's, on the chunk's operands)
  Index keys = 0;
  const std::int32_t* row_of_ = nullptr;  // token → row of q, k, v (none: the identity)
};

}  // namespace effattn::detail::lsh

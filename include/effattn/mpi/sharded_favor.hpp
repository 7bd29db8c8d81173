#pragma once
// ShardedFavor: FAVOR+ over a sequence sharded across MPI ranks, with one reduction of the
// key sums (bidirectional) or one prefix scan of the running state (causal).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "effattn/attention/favor.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace_pool.hpp"
#include "effattn/mpi/communicator.hpp"
#include "effattn/mpi/detail/sharded_call.hpp"
#include "effattn/mpi/sequence_shards.hpp"

namespace effattn::mpi {

/// Sequence-parallel FAVOR+. Each rank holds the rows of its shard of every sequence (q, k
/// [batch·n_r × heads·d_key], v, out [batch·n_r × heads·d_value]) and gets what
/// AttentionCore<Favor<S, Map>, Masking> computes on the whole sequences, up to rounding.
///   bidirectional: every rank sums its keys (Σ φ(k)vᵀ, Σ φ(k), Σ v per sequence and head);
///     one all-reduce of the largest stabiliser shift and one of the sums (m·d_v + m + d_v
///     values per sequence and head) make them whole; queries are then local. Backward adds one
///     all-reduce of the queries' sums Σ φ(q)ᵀ dnum, Σ φ(q)ᵀ dden for the keys' gradients.
///   causal: every rank sums its keys into FAVOR+'s running state; an exclusive scan over the
///     ranks (recursive doubling, ⌈log₂ P⌉ exchanges of m·d_v + m + 1 values per sequence and
///     head) gives each rank the state of the positions before its shard, from which it runs
///     the causal forward. Backward: the same scan, then one exclusive scan in reverse order of
///     what later queries add to earlier keys' gradients. Needs shards in rank order
///     (SequenceShards::contiguous): FAVOR+'s work is the same for every position, so
///     contiguous shards are balanced.
/// Every rank must pass the same Favor (same random directions: the same seed, or the same
/// projections set on every rank). Nothing is kept for backward but the shape (backward
/// recomputes, as Favor does). A call some rank rejects throws on every rank before any data
/// moves.
template <class S, class Map, class Masking = Bidirectional>
class ShardedFavor {
  static_assert(detail::assert_sharded_masking<Masking>());

 public:
  using Scalar = S;
  using Policy = Favor<S, Map>;
  static constexpr bool causal = Masking::causal;

  ShardedFavor(HeadLayout layout, Communicator comm, SequenceShards shards)
      : call_("mpi::ShardedFavor", layout, comm, std::move(shards)) {
    effattn::detail::require(!causal || call_.shards().in_rank_order(), call_.who(), "shards",
                             "not one segment per rank in rank order",
                             "SequenceShards::contiguous (causal FAVOR+ scans the ranks in order)");
  }

  const SequenceShards& shards() const { return call_.shards(); }
  const HeadLayout& layout() const { return call_.layout(); }
  /// The checks and agreement of its calls (ShardedCore runs a layer's checks through it).
  const detail::ShardedCall& call() const { return call_; }
  Index local_length() const { return call_.local_length(); }
  /// Values this rank has handed to MPI since construction, in bytes (an all-reduce counts
  /// once at its size; the MPI library may move up to twice that).
  std::size_t bytes_sent() const { return bytes_sent_; }
  bool kept_for(const SequenceShape& shape) const {
    return kept_ && detail::ShardedCall::same_shape(shape, last_);
  }
  void release_saved() { kept_ = false; }
  std::size_t saved_bytes() const { return 0; }
  /// Most scratch the kernels' workspaces held (all threads), and the reduced sums.
  std::size_t scratch_bytes() const {
    return pool_.peak_bytes() +
           sizeof(S) * (sums_.capacity() + shifts_.capacity() + gradient_sums_.capacity() +
                        normalisers_.capacity() + chunk_shifts_.capacity());
  }

  void forward(const Policy& favor, ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
               const SequenceShape& shape, bool keep_saved) {
    const std::vector<Index> valid =
        call_.begin_forward<S>(q, k, v, out, shape, [&] { check_policy(favor); });
    prepare(favor);
    Problems p(*this, favor, shape);
    if constexpr (causal) {
      prefix_states(favor, k, v, shape);
      parallel_for(p.count(), threads(), [&](Index problem, int slot) {
        Record r = p.state(sums_, problem);
        favor.attend_causal(p.rows(q, problem, p.dk), p.rows(k, problem, p.dk),
                            p.rows(v, problem, p.dv), p.rows(out, problem, p.dv), p.keys(problem),
                            p.head(problem), r.state, r.z, *r.shift, pool_[slot]);
      });
    } else {
      whole_key_sums(favor, k, v, shape, valid);
      parallel_for(p.count(), threads(), [&](Index problem, int slot) {
        auto o = p.rows(out, problem, p.dv);
        if (valid[std::size_t(p.sequence(problem))] == 0) {
          o.setZero();
          return;
        }
        Record r = p.state(sums_, problem);
        favor.attend(p.rows(q, problem, p.dk), r.state, r.z, o, p.head(problem), pool_[slot]);
      });
    }
    kept_ = keep_saved;
    last_ = shape;
  }

  /// Backward of the last forward that kept its state, on the same q, k, v, out: overwrites
  /// dq, dk, dv with the gradients of this rank's rows.
  void backward(const Policy& favor, ConstView<S> q, ConstView<S> k, ConstView<S> v,
                ConstView<S> out, ConstView<S> d_out, View<S> dq, View<S> dk, View<S> dv,
                const SequenceShape& shape) {
    const std::vector<Index> valid = call_.begin_backward<S>(
        q, k, v, out, d_out, dq, dk, dv, shape, kept_for(shape), [&] { check_policy(favor); });
    prepare(favor);
    Problems p(*this, favor, shape);
    dq.setZero();
    dk.setZero();
    dv.setZero();
    const std::size_t record = std::size_t(p.f * p.dv + p.f + 1);
    gradient_sums_.assign(std::size_t(p.count()) * record, S(0));
    if constexpr (causal) {
      prefix_states(favor, k, v, shape);
      const Index n_r = local_length(), spans = favor.causal_shifts(n_r);
      normalisers_.resize(std::size_t(p.count() * n_r));
      chunk_shifts_.resize(std::size_t(p.count() * spans));
      parallel_for(p.count(), threads(), [&](Index problem, int slot) {
        Record r = p.state(sums_, problem), g = p.state(gradient_sums_, problem);
        *g.shift = *r.shift;  // the frame of what these queries add to earlier keys
        favor.causal_query_gradients(p.rows(q, problem, p.dk), p.rows(k, problem, p.dk),
                                     p.rows(v, problem, p.dv), p.rows(out, problem, p.dv),
                                     p.rows(d_out, problem, p.dv), p.keys(problem), p.head(problem),
                                     r.state, r.z, *r.shift, normalisers_.data() + problem * n_r,
                                     chunk_shifts_.data() + problem * spans,
                                     p.rows(dq, problem, p.dk), g.state, g.z, pool_[slot]);
      });
      // What the queries after this rank add to its keys: a scan from the last rank back.
      scan(gradient_sums_, record, true);
      const Index last = (n_r - 1) / favor.chunk(true) + 1;
      parallel_for(p.count(), threads(), [&](Index problem, int slot) {
        Record g = p.state(gradient_sums_, problem);
        const S frame = chunk_shifts_[std::size_t(problem * spans + last)];
        // To the frame of this rank's last state (at most the later ranks' frames).
        const bool finite = frame != minus_infinity && *g.shift != minus_infinity;
        const S rescale = finite ? std::exp(frame - *g.shift) : S(0);
        g.state *= rescale;
        g.z *= rescale;
        favor.causal_key_gradients(
            p.rows(q, problem, p.dk), p.rows(k, problem, p.dk), p.rows(v, problem, p.dv),
            p.rows(out, problem, p.dv), p.rows(d_out, problem, p.dv), p.keys(problem),
            p.head(problem), normalisers_.data() + problem * n_r,
            chunk_shifts_.data() + problem * spans, g.state, g.z, p.rows(dk, problem, p.dk),
            p.rows(dv, problem, p.dv), pool_[slot]);
      });
      return;
    }
    whole_key_sums(favor, k, v, shape, valid);
    parallel_for(p.count(), threads(), [&](Index problem, int slot) {
      if (valid[std::size_t(p.sequence(problem))] == 0) return;
      Record r = p.state(sums_, problem), g = p.state(gradient_sums_, problem);
      favor.query_gradients(p.rows(q, problem, p.dk), p.rows(out, problem, p.dv),
                            p.rows(d_out, problem, p.dv), r.state, r.z, p.head(problem),
                            p.rows(dq, problem, p.dk), g.state, g.z, pool_[slot]);
    });
    call_.comm().all_reduce(gradient_sums_.data(), gradient_sums_.size());
    bytes_sent_ += gradient_sums_.size() * sizeof(S);
    parallel_for(p.count(), threads(), [&](Index problem, int slot) {
      const Index keys = p.keys(problem);
      if (keys == 0) return;
      Record r = p.state(sums_, problem), g = p.state(gradient_sums_, problem);
      favor.key_gradients(p.rows(k, problem, p.dk).topRows(keys),
                          p.rows(v, problem, p.dv).topRows(keys), *r.shift, g.state, g.z,
                          p.head(problem), p.rows(dk, problem, p.dk).topRows(keys),
                          p.rows(dv, problem, p.dv).topRows(keys), pool_[slot]);
    });
  }

 private:
  static constexpr S minus_infinity = -std::numeric_limits<S>::infinity();

  // A record of one (sequence, head): [shift | state (f × d_v) | z (1 × f) | v_sum (1 × d_v)],
  // v_sum in bidirectional key sums only.
  struct Record {
    S* shift;
    Eigen::Map<Matrix<S>> state, z, v_sum;
  };

  // The (sequence, head) problems of a call and their rows.
  struct Problems {
    Problems(const ShardedFavor& sf, const Policy& favor, const SequenceShape& shape_)
        : shape(shape_),
          n_r(sf.local_length()),
          h(sf.layout().heads),
          dk(sf.layout().d_key),
          dv(sf.layout().d_value),
          f(favor.feature_width()) {}
    Index count() const { return shape.batch * h; }
    Index sequence(Index problem) const { return problem / h; }
    Index head(Index problem) const { return problem % h; }
    Index keys(Index problem) const { return shape.valid_length(sequence(problem)); }
    template <class M>
    auto rows(M& m, Index problem, Index width) const {
      return m.block(sequence(problem) * n_r, head(problem) * width, n_r, width);
    }
    std::size_t record(bool with_v_sum) const {
      return std::size_t(1 + f * dv + f + (with_v_sum ? dv : 0));
    }
    Record state(std::vector<S>& buffer, Index problem) const {
      const std::size_t size = buffer.size() / std::size_t(count());
      S* base = buffer.data() + std::size_t(problem) * size;
      return {base, Eigen::Map<Matrix<S>>(base + 1, f, dv),
              Eigen::Map<Matrix<S>>(base + 1 + f * dv, 1, f),
              Eigen::Map<Matrix<S>>(base + 1 + f * dv + f, 1, size > record(false) ? dv : 0)};
    }
    const SequenceShape& shape;
    Index n_r, h, dk, dv, f;
  };

  void check_policy(const Policy& favor) const {
    effattn::detail::require(favor.projection(0).cols() == call_.layout().d_key, call_.who(),
                             "policy", "random directions of another head width",
                             "a Favor made for this layout");
  }

  int threads() const { return threads_; }
  void prepare(const Policy& favor) {
    threads_ = max_threads();
    pool_.resize(threads_);
    const Index n = local_length();
    pool_.reserve_each(favor.scratch_bytes(n, n, call_.layout().d_key, call_.layout().d_value));
  }

  // sums_ ← for every (sequence, head), the state before this rank's first position (the
  // running state of the keys of the ranks before, in the frame of their largest shift).
  template <class K, class V>
  void prefix_states(const Policy& favor, const K& k, const V& v, const SequenceShape& shape) {
    Problems p(*this, favor, shape);
    const std::size_t record = p.record(false);
    sums_.assign(std::size_t(p.count()) * record, S(0));
    parallel_for(p.count(), threads(), [&](Index problem, int slot) {
      Record r = p.state(sums_, problem);
      *r.shift = minus_infinity;
      favor.sum_causal_keys(p.rows(k, problem, p.dk), p.rows(v, problem, p.dv), p.keys(problem),
                            p.head(problem), r.state, r.z, *r.shift, pool_[slot]);
    });
    scan(sums_, record, false);
  }

  // Exclusive scan of records [frame | values]. Forward states are in the frame of their
  // largest shift s (values × e^{s} are the true sums), gradient sums in the frame of their
  // smallest (values × e^{−s}); combining rescales to that frame, so every factor is ≤ 1.
  // A record whose frame is −∞ holds zeros. The first rank of the scan gets such records
  // (nothing comes before it).
  void scan(std::vector<S>& buffer, std::size_t record, bool reverse) {
    const auto result = call_.comm().exclusive_scan(
        buffer, reverse, [record, reverse, n = buffer.size()](S* into, const S* from) {
          for (std::size_t at = 0; at < n; at += record)
            combine_frames(into + at, from + at, record, !reverse);
        });
    bytes_sent_ += result.values_sent * sizeof(S);
    if (!result.received) {
      std::fill(buffer.begin(), buffer.end(), S(0));
      for (std::size_t at = 0; at < buffer.size(); at += record)
        buffer[at] = minus_infinity;
    }
  }
  static void combine_frames(S* a, const S* b, std::size_t length, bool largest) {
    a[0] = effattn::detail::favor::combine_frames(a[0], a + 1, b[0], b + 1, length - 1, largest);
  }

  // sums_ ← for every (sequence, head), the whole sequence's key sums with ε, in the frame
  // of the largest shift of all its keys; shifts_ ← that shift.
  template <class K, class V>
  void whole_key_sums(const Policy& favor, const K& k, const V& v, const SequenceShape& shape,
                      const std::vector<Index>& valid) {
    Problems p(*this, favor, shape);
    const std::size_t record = p.record(true);
    sums_.assign(std::size_t(p.count()) * record, S(0));
    shifts_.resize(std::size_t(p.count()));
    parallel_for(p.count(), threads(), [&](Index problem, int slot) {
      Record r = p.state(sums_, problem);
      const Index keys = p.keys(problem);
      shifts_[std::size_t(problem)] = *r.shift = favor.sum_keys(
          p.rows(k, problem, p.dk).topRows(keys), p.rows(v, problem, p.dv).topRows(keys),
          p.head(problem), r.state, r.z, r.v_sum, pool_[slot]);
    });
    call_.comm().all_reduce(shifts_.data(), shifts_.size(), true);
    for (Index problem = 0; problem < p.count(); ++problem) {
      Record r = p.state(sums_, problem);
      const S mine = *r.shift, whole = shifts_[std::size_t(problem)];
      if (mine != minus_infinity && mine != whole) {
        r.state *= std::exp(mine - whole);
        r.z *= std::exp(mine - whole);
      }
      *r.shift = 0;  // (not summed: the frame is shifts_)
    }
    call_.comm().all_reduce(sums_.data(), sums_.size());
    bytes_sent_ += (shifts_.size() + sums_.size()) * sizeof(S);
    for (Index problem = 0; problem < p.count(); ++problem) {
      Record r = p.state(sums_, problem);
      *r.shift = shifts_[std::size_t(problem)];
      favor.add_key_epsilon(r.state, r.z, r.v_sum, valid[std::size_t(p.sequence(problem))]);
    }
  }

  detail::ShardedCall call_;
  std::vector<S> sums_;           // per (sequence, head): key sums or prefix states
  std::vector<S> shifts_;         // bidirectional: each key sum's shift
  std::vector<S> gradient_sums_;  // per (sequence, head): the queries' sums for the keys
  std::vector<S> normalisers_, chunk_shifts_;  // causal backward, between its sweeps
  WorkspacePool pool_;
  int threads_ = 1;
  bool kept_ = false;
  SequenceShape last_{};
  std::size_t bytes_sent_ = 0;
};

}  // namespace effattn::mpi

#pragma once
// RingAttention: exact softmax attention over a sequence sharded across MPI ranks, the keys and
// values travelling around the ring while each rank attends its queries to them.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "effattn/attention/full_attention.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/core/aliasing.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace_pool.hpp"
#include "effattn/mpi/communicator.hpp"
#include "effattn/mpi/detail/sharded_call.hpp"
#include "effattn/mpi/sequence_shards.hpp"

namespace effattn::mpi {

/// Sequence-parallel FullAttention (ring attention, Liu et al. 2023, on FlashAttention's
/// blocks). Each rank holds the rows of its shard of every sequence: q, k [batch·n_r ×
/// heads·d_key], v, out [batch·n_r × heads·d_value], n_r = shards.local_length(rank). In P
/// steps every rank's keys and values visit every rank (sent to the next rank without
/// blocking while the current block computes); each rank attends its queries to each block
/// with FullAttention's kernels and combines the partial outputs by their log-sum-exp. The
/// result is what AttentionCore<FullAttention<S>, Masking> computes on the whole sequences,
/// up to rounding. Backward sends keys, values and their gradient sums around once more:
/// each rank adds its queries' contributions, and the sums arrive back at their owner.
///
/// `shape` is this rank's: shape.seq = its local_length(), and shape.lengths (if any) the
/// number of valid rows of each of its sequences, as the layers see them. Padding must be at
/// the end of each whole sequence (positions ≥ L_b are padding), which on every rank is a
/// prefix of its rows when its segments are listed in increasing order: the ranks' counts add
/// up to L_b, and each rank checks that its count is the one L_b implies. Causal masking
/// uses global positions, so any shard order works; SequenceShards::balanced gives every
/// rank the same causal work. Every rank must call forward and backward together. A call
/// some rank rejects throws on every rank (the others with "rejected on another rank")
/// before any data moves.
template <class S, class Masking = Bidirectional>
class RingAttention {
  static_assert(detail::assert_sharded_masking<Masking>());

 public:
  using Scalar = S;
  using Policy = FullAttention<S>;
  static constexpr bool causal = Masking::causal;

  RingAttention(HeadLayout layout, Communicator comm, SequenceShards shards)
      : call_("mpi::RingAttention", layout, comm, std::move(shards)) {}

  const SequenceShards& shards() const { return call_.shards(); }
  const HeadLayout& layout() const { return call_.layout(); }
  /// The checks and agreement of its calls (ShardedCore runs a layer's checks through it).
  const detail::ShardedCall& call() const { return call_; }
  /// Rows per sequence on this rank.
  Index local_length() const { return call_.local_length(); }
  /// Values this rank has sent since construction (forward and backward).
  std::size_t bytes_sent() const { return bytes_sent_; }
  /// Whether the last forward kept its state for a backward on this shape.
  bool kept_for(const SequenceShape& shape) const {
    return !lse_.empty() && detail::ShardedCall::same_shape(shape, last_);
  }
  void release_saved() {
    lse_.clear();
    lse_.shrink_to_fit();
    last_ = {};
  }
  /// What a forward keeps for backward: one log-sum-exp per (row, head).
  std::size_t saved_bytes() const { return sizeof(S) * lse_.size(); }
  /// Most scratch the kernels' workspaces held (all threads), and the ring's buffers.
  std::size_t scratch_bytes() const {
    return pool_.peak_bytes() + sizeof(S) * (ring_[0].capacity() + ring_[1].capacity());
  }

  /// `policy` is the attention on each pair of blocks (its tiles); every rank passes the same.
  void forward(const Policy& policy, ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
               const SequenceShape& shape, bool keep_saved) {
    const std::vector<Index> valid = call_.begin_forward<S>(q, k, v, out, shape, [] {});
    const Index batch = shape.batch, h = call_.layout().heads, dk = call_.layout().d_key,
                dv = call_.layout().d_value;
    const int rank = call_.comm().rank(), ranks = call_.comm().size();
    const Index n_r = local_length(), most = call_.shards().longest_local_length();
    const Index kv_width = h * (dk + dv);
    for (auto& buffer : ring_)
      buffer.resize(std::size_t(batch * most * kv_width));
    pack(k, v, ring_[0].data(), batch * n_r);

    lse_.assign(std::size_t(batch * h * n_r), -std::numeric_limits<S>::infinity());
    out.setZero();
    prepare_slots(policy);
    Communicator::Exchange exchange;
    for (int step = 0; step < ranks; ++step) {
      const int owner = (rank - step + ranks) % ranks, cur = step % 2;
      if (step + 1 < ranks) {
        const int next_owner = (owner - 1 + ranks) % ranks;
        const std::size_t count =
            std::size_t(batch * call_.shards().local_length(owner) * kv_width);
        call_.comm().start_exchange(
            exchange, ring_[cur].data(), count, call_.comm().next(), ring_[1 - cur].data(),
            std::size_t(batch * call_.shards().local_length(next_owner) * kv_width),
            call_.comm().previous());
        bytes_sent_ += count * sizeof(S);
      }
      const Index n_j = call_.shards().local_length(owner);
      const Eigen::Map<const Matrix<S>> kj(ring_[cur].data(), batch * n_j, h * dk);
      const Eigen::Map<const Matrix<S>> vj(ring_[cur].data() + batch * n_j * h * dk, batch * n_j,
                                           h * dv);
      parallel_for(batch * h, int(slots_.size()), [&](Index problem, int slot) {
        const Index b = problem / h, head = problem % h;
        Slot& sl = slots_[std::size_t(slot)];
        for_each_pair(owner, valid[std::size_t(b)], [&](const Pair& p) {
          auto o = sl.out.topRows(p.nq);
          policy.forward(q.block(b * n_r + p.q_row, head * dk, p.nq, dk),
                         kj.block(b * n_j + p.k_row, head * dk, p.nk, dk),
                         vj.block(b * n_j + p.k_row, head * dv, p.nk, dv), o, &sl.saved,
                         p.ctx(head), pool_[slot]);
          effattn::detail::merge_softmax_rows(out.block(b * n_r + p.q_row, head * dv, p.nq, dv), o,
                                              lse_.data() + (b * h + head) * n_r + p.q_row,
                                              sl.saved.lse.data(), p.nq);
        });
      });
      exchange.wait();
    }
    // Rows that saw no key anywhere: output 0 (already), and +∞ as FullAttention keeps them.
    for (S& l : lse_)
      if (l == -std::numeric_limits<S>::infinity()) l = std::numeric_limits<S>::infinity();
    last_ = keep_saved ? shape : SequenceShape{};
    if (!keep_saved) lse_.clear();
  }

  /// Backward of the last forward that kept its state, on the same q, k, v, out: overwrites
  /// dq, dk, dv with the gradients of this rank's rows.
  void backward(const Policy& policy, ConstView<S> q, ConstView<S> k, ConstView<S> v,
                ConstView<S> out, ConstView<S> d_out, View<S> dq, View<S> dk, View<S> dv,
                const SequenceShape& shape) {
    const std::vector<Index> valid =
        call_.begin_backward<S>(q, k, v, out, d_out, dq, dk, dv, shape, kept_for(shape), [] {});
    const Index batch = shape.batch, h = call_.layout().heads, dkw = call_.layout().d_key,
                dvw = call_.layout().d_value;
    const int rank = call_.comm().rank(), ranks = call_.comm().size();
    const Index n_r = local_length(), most = call_.shards().longest_local_length();
    const Index width = 2 * h * (dkw + dvw);  // k, v, dk, dv
    for (auto& buffer : ring_)
      buffer.resize(std::size_t(batch * most * width));
    pack(k, v, ring_[0].data(), batch * n_r);
    std::fill_n(ring_[0].data() + batch * n_r * h * (dkw + dvw), batch * n_r * h * (dkw + dvw),
                S(0));
    dq.setZero();
    prepare_slots(policy);
    int cur = 0;
    for (int step = 0; step < ranks; ++step) {
      const int owner = (rank - step + ranks) % ranks;
      const Index n_j = call_.shards().local_length(owner), rows = batch * n_j;
      S* base = ring_[std::size_t(cur)].data();
      const Eigen::Map<const Matrix<S>> kj(base, rows, h * dkw);
      const Eigen::Map<const Matrix<S>> vj(base + rows * h * dkw, rows, h * dvw);
      Eigen::Map<Matrix<S>> dkj(base + rows * h * (dkw + dvw), rows, h * dkw);
      Eigen::Map<Matrix<S>> dvj(base + rows * h * (2 * dkw + dvw), rows, h * dvw);
      parallel_for(batch * h, int(slots_.size()), [&](Index problem, int slot) {
        const Index b = problem / h, head = problem % h;
        Slot& sl = slots_[std::size_t(slot)];
        for_each_pair(owner, valid[std::size_t(b)], [&](const Pair& p) {
          const Index qr = b * n_r + p.q_row, kr = b * n_j + p.k_row;
          sl.saved.lse.head(p.nq) =
              Eigen::Map<const RowVector<S>>(lse_.data() + (b * h + head) * n_r + p.q_row, p.nq);
          auto gq = sl.dq.topRows(p.nq);
          auto gk = sl.dk.topRows(p.nk);
          auto gv = sl.dv.topRows(p.nk);
          policy.backward(q.block(qr, head * dkw, p.nq, dkw), kj.block(kr, head * dkw, p.nk, dkw),
                          vj.block(kr, head * dvw, p.nk, dvw), out.block(qr, head * dvw, p.nq, dvw),
                          d_out.block(qr, head * dvw, p.nq, dvw), sl.saved, gq, gk, gv, p.ctx(head),
                          pool_[slot]);
          dq.block(qr, head * dkw, p.nq, dkw) += gq;
          dkj.block(kr, head * dkw, p.nk, dkw) += gk;
          dvj.block(kr, head * dvw, p.nk, dvw) += gv;
        });
      });
      if (ranks > 1) {  // pass the block on; after P passes each is back with its owner
        const int next_owner = (owner - 1 + ranks) % ranks;
        const std::size_t count = std::size_t(rows * width);
        Communicator::Exchange exchange;
        call_.comm().start_exchange(
            exchange, base, count, call_.comm().next(), ring_[std::size_t(1 - cur)].data(),
            std::size_t(batch * call_.shards().local_length(next_owner) * width),
            call_.comm().previous());
        bytes_sent_ += count * sizeof(S);
        exchange.wait();
        cur = 1 - cur;
      }
    }
    const Index rows = batch * n_r;
    const S* mine = ring_[std::size_t(cur)].data();
    dk = Eigen::Map<const Matrix<S>>(mine + rows * h * (dkw + dvw), rows, h * dkw);
    dv = Eigen::Map<const Matrix<S>>(mine + rows * h * (2 * dkw + dvw), rows, h * dvw);
  }

 private:
  // One query segment of this rank against one key segment of the block's owner.
  struct Pair {
    Index q_row, nq, k_row, nk;  // local row offsets (within a sequence) and lengths
    Index key_length, shift;     // valid keys of the segment; query i sees key j ≤ i + shift
    bool masked;
    HeadContext ctx(Index head) const {
      HeadContext c;
      c.head = head;
      c.key_length = key_length;
      c.causal = masked;
      c.causal_shift = shift;
      return c;
    }
  };

  // Calls f(pair) for every (query segment, key segment) pair of a sequence with `valid` valid
  // positions in which some query sees some key.
  template <class F>
  void for_each_pair(int owner, Index valid, F&& f) const {
    Index q_row = 0;
    for (const Segment& qs : call_.shards().segments(call_.comm().rank())) {
      Index k_row = 0;
      for (const Segment& ks : call_.shards().segments(owner)) {
        const Index key_length = std::clamp<Index>(valid - ks.offset, 0, ks.length);
        const bool visible = key_length > 0 && (!causal || ks.offset <= qs.offset + qs.length - 1);
        if (visible)
          f(Pair{q_row, qs.length, k_row, ks.length, key_length, qs.offset - ks.offset, causal});
        k_row += ks.length;
      }
      q_row += qs.length;
    }
  }

  // The local keys and values, row-major, into a ring buffer: [k | v].
  void pack(ConstView<S> k, ConstView<S> v, S* to, Index rows) const {
    Eigen::Map<Matrix<S>>(to, rows, k.cols()) = k;
    Eigen::Map<Matrix<S>>(to + rows * k.cols(), rows, v.cols()) = v;
  }

  // Per-thread block results and kernel workspaces, sized for the longest segments.
  struct Slot {
    Matrix<S> out, dq, dk, dv;
    typename Policy::Saved saved;
  };
  void prepare_slots(const Policy& policy) {
    const int threads = max_threads();
    const Index seg = call_.shards().longest_segment(), dk = call_.layout().d_key,
                dv = call_.layout().d_value;
    slots_.resize(std::size_t(threads));
    for (Slot& s : slots_) {
      s.out.resize(seg, dv);
      s.dq.resize(seg, dk);
      s.dk.resize(seg, dk);
      s.dv.resize(seg, dv);
      s.saved = policy.make_saved(seg, seg);
    }
    pool_.resize(threads);
    pool_.reserve_each(policy.scratch_bytes(seg, seg, dk, dv));
  }

  detail::ShardedCall call_;
  std::vector<S> ring_[2];
  std::vector<S> lse_;  // batch × heads × n_r, kept for backward
  SequenceShape last_{};
  std::vector<Slot> slots_;
  WorkspacePool pool_;
  std::size_t bytes_sent_ = 0;
};

}  // namespace effattn::mpi

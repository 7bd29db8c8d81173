#pragma once
// ShardedLowRank: Linformer over a sequence sharded across MPI ranks, with one all-reduce of
// the projected keys and values.

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

#include "effattn/attention/full_attention.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/low_rank.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/attention/projections/dense_projection.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace_pool.hpp"
#include "effattn/mpi/communicator.hpp"
#include "effattn/mpi/detail/sharded_call.hpp"
#include "effattn/mpi/sequence_shards.hpp"

namespace effattn::mpi {

/// Sequence-parallel Linformer (LowRank with the learned DenseProjection). Each rank holds the
/// rows of its shard of every sequence (q, k [batch·n_r × heads·d_key], v, out [batch·n_r ×
/// heads·d_value]) and the columns of E and F for its positions: it projects its keys and
/// values, E[:, its positions]·k and F[:, its positions]·v, and one all-reduce of these
/// partial products (k·(d_key + d_value) values per sequence and head) gives every rank the
/// whole E·K and F·V; its queries then attend to them locally. Backward: the queries'
/// gradients of E·K and F·V are summed by one all-reduce, and each rank forms dk, dv of its
/// rows and dE, dF of its columns (all_reduce_gradients then sums dE, dF over the ranks).
/// The result is what AttentionCore<LowRank<S>> computes on the whole sequences, up to
/// rounding. Bidirectional only (Linformer cannot be causal); any shards. Forward keeps the
/// projected keys and values and each query's log-sum-exp for backward. Every rank must pass
/// the same LowRank (the same E and F). A call some rank rejects throws on every rank before
/// any data moves.
template <class S, class Masking = Bidirectional>
class ShardedLowRank {
  static_assert(detail::assert_sharded_masking<Masking>());
  static_assert(!Masking::causal,
                "effattn: LowRank (Linformer) cannot be causal: its projections E, F mix all "
                "positions of the sequence.");

 public:
  using Scalar = S;
  using Policy = LowRank<S, DenseProjection>;
  static constexpr bool causal = false;

  ShardedLowRank(HeadLayout layout, Communicator comm, SequenceShards shards)
      : call_("mpi::ShardedLowRank", layout, comm, std::move(shards)) {}

  const SequenceShards& shards() const { return call_.shards(); }
  const HeadLayout& layout() const { return call_.layout(); }
  /// The checks and agreement of its calls (ShardedCore runs a layer's checks through it).
  const detail::ShardedCall& call() const { return call_; }
  Index local_length() const { return call_.local_length(); }
  /// Values this rank has handed to MPI since construction, in bytes (an all-reduce counts
  /// once at its size; the MPI library may move up to twice that).
  std::size_t bytes_sent() const { return bytes_sent_; }
  bool kept_for(const SequenceShape& shape) const {
    return !saved_.empty() && detail::ShardedCall::same_shape(shape, last_);
  }
  void release_saved() {
    saved_.clear();
    saved_.shrink_to_fit();
    last_ = {};
  }
  /// What a forward keeps for backward: the projected keys and values (k × (d_key + d_value))
  /// and the queries' log-sum-exp, per sequence and head.
  std::size_t saved_bytes() const {
    std::size_t bytes = sizeof(S) * projected_.size();
    for (const auto& s : saved_)
      bytes += s.bytes();
    return bytes;
  }
  /// Most scratch the kernels' workspaces held (all threads), and the projected rows.
  std::size_t scratch_bytes() const {
    return pool_.peak_bytes() + sizeof(S) * (projected_.capacity() + part_.capacity());
  }

  void forward(const Policy& policy, ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
               const SequenceShape& shape, bool keep_saved) {
    const std::vector<Index> valid =
        call_.begin_forward<S>(q, k, v, out, shape, [&] { check_policy(policy); });
    const Index problems = shape.batch * layout().heads, r = rank_of(policy);
    prepare(policy);
    // This rank's share of E·K and F·V, summed over the ranks.
    projected_.assign(std::size_t(problems * r * width()), S(0));
    parallel_for(problems, threads_, [&](Index problem, int slot) {
      const Index b = problem / layout().heads, head = problem % layout().heads;
      for_each_segment(b, shape, [&](Index row, const Segment& s, Index keys) {
        project(policy.projection(head, false), rows(k, b, row, s.length, head, d_key()), keys,
                keys_of(problem, r), s.offset, slot);
        project(policy.projection(head, true), rows(v, b, row, s.length, head, d_value()), keys,
                values_of(problem, r), s.offset, slot);
      });
    });
    call_.comm().all_reduce(projected_.data(), projected_.size());
    bytes_sent_ += projected_.size() * sizeof(S);
    saved_.resize(keep_saved ? std::size_t(problems) : 0);
    parallel_for(problems, threads_, [&](Index problem, int slot) {
      const Index b = problem / layout().heads, head = problem % layout().heads;
      auto* saved = keep_saved ? &saved_[std::size_t(problem)] : nullptr;
      if (saved) *saved = policy.attention().make_saved(local_length(), r);
      policy.attention().forward(rows(q, b, 0, local_length(), head, d_key()), keys_of(problem, r),
                                 values_of(problem, r),
                                 rows(out, b, 0, local_length(), head, d_value()), saved,
                                 context(policy, b, head, valid), pool_[slot]);
    });
    last_ = keep_saved ? shape : SequenceShape{};
    if (!keep_saved) projected_.clear();
  }

  /// Backward of the last forward that kept its state, on the same q, k, v, out: overwrites
  /// dq, dk, dv with the gradients of this rank's rows and adds this rank's columns of dE, dF
  /// to the projections' gradients.
  void backward(Policy& policy, ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, View<S> dq, View<S> dk, View<S> dv,
                const SequenceShape& shape) {
    const std::vector<Index> valid = call_.begin_backward<S>(
        q, k, v, out, d_out, dq, dk, dv, shape, kept_for(shape), [&] { check_policy(policy); });
    const Index problems = shape.batch * layout().heads, r = rank_of(policy);
    prepare(policy);
    part_.assign(std::size_t(problems * r * width()), S(0));  // d(E·K), d(F·V)
    parallel_for(problems, threads_, [&](Index problem, int slot) {
      const Index b = problem / layout().heads, head = problem % layout().heads;
      Eigen::Map<Matrix<S>> d_kp(part_.data() + problem * r * width(), r, d_key());
      Eigen::Map<Matrix<S>> d_vp(part_.data() + problem * r * width() + r * d_key(), r, d_value());
      policy.attention().backward(
          rows(q, b, 0, local_length(), head, d_key()), keys_of(problem, r), values_of(problem, r),
          rows(out, b, 0, local_length(), head, d_value()),
          rows(d_out, b, 0, local_length(), head, d_value()), saved_[std::size_t(problem)],
          rows(dq, b, 0, local_length(), head, d_key()), d_kp, d_vp,
          context(policy, b, head, valid), pool_[slot]);
    });
    call_.comm().all_reduce(part_.data(), part_.size());
    bytes_sent_ += part_.size() * sizeof(S);
    // This rank's rows of dk, dv and columns of dE, dF: its segments of every sequence and head
    // as the policy's projection parts.
    struct Part {
      Index problem, row;
      Segment segment;
      Index keys;
    };
    std::vector<Part> parts;
    for (Index problem = 0; problem < problems; ++problem)
      for_each_segment(problem / layout().heads, shape,
                       [&](Index row, const Segment& s, Index keys) {
                         parts.push_back({problem, row, s, keys});
                       });
    policy.backward_projections(
        Index(parts.size()),
        [&](Index i) {
          const Part& p = parts[std::size_t(i)];
          const Index b = p.problem / layout().heads, head = p.problem % layout().heads;
          const Index length = p.segment.length;
          const S* part = part_.data() + p.problem * r * width();
          return typename Policy::ProjectionPart{
              head,
              rows(k, b, p.row, length, head, d_key()),
              rows(v, b, p.row, length, head, d_value()),
              rows(dk, b, p.row, length, head, d_key()),
              rows(dv, b, p.row, length, head, d_value()),
              p.keys,
              p.segment.offset,
              Eigen::Map<const Matrix<S>>(part, r, d_key()),
              Eigen::Map<const Matrix<S>>(part + r * d_key(), r, d_value())};
        },
        threads_, [&](int slot) -> Workspace& { return pool_[slot]; });
  }

 private:
  Index d_key() const { return layout().d_key; }
  Index d_value() const { return layout().d_value; }
  Index width() const { return d_key() + d_value(); }
  static Index rank_of(const Policy& policy) { return policy.projection(0).rows(0); }

  // Rows [row, row + count) of sequence b, head `head` of width w.
  template <class M>
  auto rows(M& m, Index b, Index row, Index count, Index head, Index w) const {
    return m.block(b * local_length() + row, head * w, count, w);
  }
  Eigen::Map<Matrix<S>> keys_of(Index problem, Index r) {
    return {projected_.data() + problem * r * width(), r, d_key()};
  }
  Eigen::Map<Matrix<S>> values_of(Index problem, Index r) {
    return {projected_.data() + problem * r * width() + r * d_key(), r, d_value()};
  }

  // Calls f(local row, segment, its valid keys) for this rank's segments of sequence b.
  template <class F>
  void for_each_segment(Index b, const SequenceShape& shape, F&& f) const {
    Index row = 0, left = shape.valid_length(b);  // valid rows are a prefix of the local rows
    for (const Segment& s : shards().segments(call_.comm().rank())) {
      const Index keys = std::clamp<Index>(left, 0, s.length);
      f(row, s, keys);
      left -= keys;
      row += s.length;
    }
  }

  // y += E[:, first …]·x through a per-thread buffer.
  template <class X, class Y>
  void project(const DenseProjection<S>& e, const X& x, Index keys, Y&& y, Index first, int slot) {
    if (keys == 0) return;
    Matrix<S>& part = buffers_[std::size_t(slot)];
    part.resize(y.rows(), y.cols());
    e.forward(x, keys, part, pool_[slot], first);
    y += part;
  }

  HeadContext context(const Policy& policy, Index b, Index head,
                      const std::vector<Index>& valid) const {
    HeadContext ctx;
    ctx.sequence = b;
    ctx.head = head;
    ctx.key_length = valid[std::size_t(b)];
    return policy.projected_context(ctx, shards().total());
  }

  void check_policy(const Policy& policy) const {
    effattn::detail::require(
        policy.projection(0).config().n_max >= shards().total(), call_.who(), "policy",
        effattn::detail::concat("projections of n_max = ", policy.projection(0).config().n_max),
        effattn::detail::concat("n_max ≥ the whole sequence's ", shards().total(), " positions"));
  }

  void prepare(const Policy& policy) {
    threads_ = max_threads();
    pool_.resize(threads_);
    buffers_.resize(std::size_t(threads_));
    pool_.reserve_each(policy.scratch_bytes(local_length(), shards().total(), d_key(), d_value()));
  }

  detail::ShardedCall call_;
  std::vector<S> projected_;  // per (sequence, head): E·K [k × d_key], then F·V [k × d_value]
  std::vector<S> part_;       // backward: their gradients
  std::vector<typename FullAttention<S>::Saved> saved_;
  std::vector<Matrix<S>> buffers_;
  WorkspacePool pool_;
  int threads_ = 1;
  SequenceShape last_{};
  std::size_t bytes_sent_ = 0;
};

}  // namespace effattn::mpi

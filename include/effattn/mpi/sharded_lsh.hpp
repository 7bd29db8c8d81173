#pragma once
// ShardedLSH: Reformer's LSH attention over a sequence sharded across MPI ranks: a distributed
// sort by (bucket, position), the sorted chunks shared out among the ranks, which fetch the rows
// their chunks need.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/lsh.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/core/workspace_pool.hpp"
#include "effattn/mpi/communicator.hpp"
#include "effattn/mpi/detail/distributed_sort.hpp"
#include "effattn/mpi/detail/rank_chunks.hpp"
#include "effattn/mpi/detail/row_exchange.hpp"
#include "effattn/mpi/detail/sharded_call.hpp"
#include "effattn/mpi/sequence_shards.hpp"

namespace effattn::mpi {

/// Sequence-parallel LSH attention (LSHAttention<S>, Reformer). Each rank holds the rows of
/// its shard of every sequence (q, k [batch·n_r × heads·d_key], v, out [batch·n_r ×
/// heads·d_value]); per sequence, head and hash round:
///
///  1. every rank hashes its own keys (the policy's rotations);
///  2. a distributed counting sort: one all-reduce of the bucket counts (buckets int32) gives
///     every bucket's first sorted index; each token's (bucket, position) goes to the rank of
///     its bucket (bucket β to rank ⌊β·P / buckets⌋), which orders its buckets' tokens by
///     position and returns each its sorted index: all-to-alls of 8 and 4 bytes per token;
///  3. the sorted order is shared out: the chunk starting at sorted index s belongs to rank
///     ⌊s·P / valid⌋, so every rank computes about 1/P of each round's queries. Each rank
///     sends its tokens to the ranks whose chunks' windows (look-back, look-forward) hold
///     them, each once over the rounds: their position, sorted index and bucket in every
///     round, and their q, k, v rows (two all-to-alls; k once when k is q, as in
///     MultiHeadAttention's shared QK);
///  4. each rank runs the policy's own chunk loop (LSHAttention::forward_chunks) on its chunks,
///     keeping every query's running max, sum and weighted values over its rounds;
///  5. one all-to-all returns these to the tokens' ranks, which combine them by log-sum-exp.
///
/// Backward mirrors 4 and 5: the tokens' ranks send d_out and each row's log-sum-exp (with
/// dO·O), the chunks' ranks run LSHAttention::backward_chunks and return the gradients of q,
/// k̂ and v, which the tokens' ranks sum and carry through the key normalisation. The result
/// is what AttentionCore<LSHAttention<S>> computes on the whole sequences (the same
/// rotations, buckets and chunks), up to rounding; causal, padding at the end of the whole
/// sequence, dedup, same_bucket and look_forward as there. Any shards.
///
/// Costs per rank and call: the attention's work divided by P (rows per round; uneven
/// buckets make it uneven); rows sent ≈ min(P, rounds · (1 + look_back + look_forward)) ·
/// n/P · (2·d_key + d_value) values (d_key + d_value with shared QK), d_value + 2 back; the bucket
/// counts (rounds · buckets int32 per sequence and head, about n/32 with the automatic 2n/chunk
/// buckets) and 12 bytes per token and round for the sort. Memory per rank is O(n/P) but for the
/// bucket counts. Forward keeps the fetched rows and each rank's chunks for backward. Every rank
/// must pass the same LSHAttention (the same rotations). The policy's work() counts this
/// rank's share. A call some rank rejects throws on every rank before any data moves.
template <class S, class Masking = Bidirectional>
class ShardedLSH {
  static_assert(detail::assert_sharded_masking<Masking>());

 public:
  using Scalar = S;
  using Policy = LSHAttention<S>;
  static constexpr bool causal = Masking::causal;

  ShardedLSH(HeadLayout layout, Communicator comm, SequenceShards shards)
      : call_("mpi::ShardedLSH", layout, comm, std::move(shards)), exchange_(call_.comm(), 0) {
    const Index n = call_.shards().total();
    effattn::detail::require(n <= std::numeric_limits<std::int32_t>::max(), call_.who(), "shards",
                             n, "at most 2^31 − 1 positions per sequence");
    for (const Segment& s : call_.shards().segments(me()))
      for (Index i = 0; i < s.length; ++i)
        position_.push_back(static_cast<std::int32_t>(s.offset + i));
  }

  const SequenceShards& shards() const { return call_.shards(); }
  const HeadLayout& layout() const { return call_.layout(); }
  /// The checks and agreement of its calls (ShardedCore runs a layer's checks through it).
  const detail::ShardedCall& call() const { return call_; }
  Index local_length() const { return call_.local_length(); }
  /// Values this rank has handed to MPI since construction, in bytes (not counting what it
  /// sends itself; an all-reduce counts once at its size).
  std::size_t bytes_sent() const { return bytes_sent_; }
  bool kept_for(const SequenceShape& shape) const {
    return kept_ && detail::ShardedCall::same_shape(shape, last_);
  }
  void release_saved() {
    problems_ = {};
    exchange_ = detail::RowExchange(call_.comm(), 0);
    rows_ = {};
    kept_ = false;
    last_ = {};
  }
  /// What a forward keeps for backward: this rank's chunks, the lists of rows sent and
  /// fetched, the fetched rows, and each local row's log-sum-exp.
  std::size_t saved_bytes() const {
    if (!kept_) return 0;
    std::size_t bytes = sizeof(S) * rows_.size();
    for (std::size_t q = 0; q < problems_.size(); ++q)
      bytes += problems_[q].bytes() + sizeof(std::int32_t) * exchange_[q].sent.size();
    return bytes;
  }
  /// Most scratch the kernels' workspaces held (all threads), and the message buffers (kept
  /// from call to call, so that a call allocates only when it needs more).
  std::size_t scratch_bytes() const {
    return pool_.peak_bytes() +
           sizeof(S) * (send_.capacity() + recv_.capacity() + (kept_ ? 0 : rows_.capacity()));
  }

  void forward(const Policy& policy, ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
               const SequenceShape& shape, bool keep_saved) {
    const Index n = shards().total();
    const std::vector<Index> valid = call_.begin_forward<S>(
        q, k, v, out, shape, [&] { policy.validate(n, n, d_key(), d_value(), causal); });
    kept_ = false;
    const Index h = layout().heads, problems = shape.batch * h;
    prepare(policy);
    problems_.assign(std::size_t(problems), Problem{});
    for (Index problem = 0; problem < problems; ++problem)
      problems_[std::size_t(problem)].valid = valid[std::size_t(problem / h)];
    exchange_ = detail::RowExchange(call_.comm(), std::size_t(problems));
    sort(policy, k);
    plan_sends(policy);
    receive_tokens(policy);

    // The rows of the tokens: q | k | v.
    // Keys that are the queries (MultiHeadAttention's shared QK) travel once, if every rank's
    // are.
    std::int64_t separate = q.data() == k.data() && q.outerStride() == k.outerStride() ? 0 : 1;
    call_.comm().all_reduce(&separate, 1, true);
    shared_qk_ = separate == 0;
    const Index width = fetched_width();
    exchange_.pack(send_, width, threads_, [&](Index problem, Index row, S* to) {
      const Index b = problem / h, head = problem % h, at = b * local_length() + row;
      copy_row(k, at, head * d_key(), d_key(), to);
      if (!shared_qk_) copy_row(q, at, head * d_key(), d_key(), to + d_key());
      copy_row(v, at, head * d_value(), d_value(), to + width - d_value());
    });
    bytes_sent_ += exchange_.exchange(send_, width, false, rows_);

    // This rank's chunks: running max, sum and Σ exp(logit − max)·v of every fetched query.
    const Index fetched = exchange_.received_rows();
    send_.resize(std::size_t(fetched * (d_value() + 2)));  // the rows went out: reuse
    Eigen::Map<Matrix<S>> partial(send_.data(), fetched, d_value() + 2);
    {
      const auto count = static_cast<std::size_t>(fetched);
      std::vector<S> m(count, -std::numeric_limits<S>::infinity()), z(count, S(0));
      partial.setZero();
      View<S> weighted = partial.leftCols(d_value());
      std::vector<double> pairs(static_cast<std::size_t>(problems), 0.0);
      on_fetched_chunks(
          policy, [&](Index problem, auto& rounds, auto& chunk, auto&& owns, Workspace& ws) {
            pairs[std::size_t(problem)] =
                policy.forward_chunks(rounds, chunk, weighted, m.data(), z.data(), owns, ws);
          });
      double all_pairs = 0;
      for (const double x : pairs)
        all_pairs += x;
      policy.record_work(all_pairs, double(problems * local_length() * policy.config().rounds *
                                           policy.plan(n).columns()));
      for (Index i = 0; i < fetched; ++i) {
        partial(i, d_value()) = m[std::size_t(i)];
        partial(i, d_value() + 1) = z[std::size_t(i)];
      }
    }
    bytes_sent_ += exchange_.exchange(send_, d_value() + 2, true, recv_);

    // Each local row combines its partial results by log-sum-exp.
    out.setZero();
    parallel_for(problems, threads_, [&](Index problem, int) {
      Problem& p = problems_[std::size_t(problem)];
      const Index b = problem / h, head = problem % h;
      p.max.assign(std::size_t(local_length()), -std::numeric_limits<S>::infinity());
      p.log_sum.assign(std::size_t(local_length()), S(0));
      exchange_.for_each_returned(
          std::size_t(problem), d_value() + 2, recv_.data(), [&](Index row, const S* r) {
            effattn::detail::merge_unnormalised_row(
                out.row(b * local_length() + row).segment(head * d_value(), d_value()),
                p.max[std::size_t(row)], p.log_sum[std::size_t(row)],
                Eigen::Map<const RowVector<S>>(r, d_value()), r[d_value()], r[d_value() + 1]);
          });
      for (Index row = 0; row < local_length(); ++row) {
        S& z = p.log_sum[std::size_t(row)];
        if (z > S(0))
          out.row(b * local_length() + row).segment(head * d_value(), d_value()) *= S(1) / z;
        z = z > S(0) ? std::log(z) : std::numeric_limits<S>::infinity();
      }
    });
    kept_ = keep_saved;
    last_ = keep_saved ? shape : SequenceShape{};
    if (!keep_saved) rows_.clear();  // its memory stays, as scratch for the next call
  }

  /// Backward of the last forward that kept its state, on the same q, k, v, out: overwrites
  /// dq, dk, dv with the gradients of this rank's rows.
  void backward(const Policy& policy, ConstView<S> q, ConstView<S> k, ConstView<S> v,
                ConstView<S> out, ConstView<S> d_out, View<S> dq, View<S> dk, View<S> dv,
                const SequenceShape& shape) {
    const Index n = shards().total();
    call_.begin_backward<S>(q, k, v, out, d_out, dq, dk, dv, shape, kept_for(shape),
                            [&] { policy.validate(n, n, d_key(), d_value(), causal); });
    const Index h = layout().heads, problems = shape.batch * h;
    prepare(policy);

    // What the chunks' ranks need of each query: d_out | max | log_sum | dO·O.
    const Index width = d_value() + 3;
    exchange_.pack(send_, width, threads_, [&](Index problem, Index row, S* to) {
      const Problem& p = problems_[std::size_t(problem)];
      const Index b = problem / h, head = problem % h, at = b * local_length() + row;
      copy_row(d_out, at, head * d_value(), d_value(), to);
      to[d_value()] = p.max[std::size_t(row)];
      to[d_value() + 1] = p.log_sum[std::size_t(row)];
      to[d_value() + 2] = d_out.row(at)
                              .segment(head * d_value(), d_value())
                              .dot(out.row(at).segment(head * d_value(), d_value()));
    });
    bytes_sent_ += exchange_.exchange(send_, width, false, recv_);
    const std::vector<S>& grads_in = recv_;

    // This rank's chunks: gradients of the fetched rows' q, k̂ and v. (Both buffers hold at
    // least one row: a rank that fetched none must not offset a null pointer.)
    const Index fetched = exchange_.received_rows(), fwidth = 2 * d_key() + d_value();
    send_.resize(std::size_t(std::max<Index>(fetched, 1) * fwidth));  // d_out went out: reuse
    if (recv_.size() < std::size_t(width)) recv_.resize(std::size_t(width));
    Eigen::Map<Matrix<S>> grads(send_.data(), fetched, fwidth);
    {
      const Eigen::Map<const Matrix<S>> in(grads_in.data(), fetched, width);
      const auto count = static_cast<std::size_t>(fetched);
      std::vector<S> m(count), z(count), delta(count);
      for (Index i = 0; i < fetched; ++i) {
        m[std::size_t(i)] = in(i, d_value());
        z[std::size_t(i)] = in(i, d_value() + 1);
        delta[std::size_t(i)] = in(i, d_value() + 2);
      }
      grads.setZero();
      View<S> g = grads;
      on_fetched_chunks(policy, [&](Index, auto& rounds, auto& chunk, auto&& owns, Workspace& ws) {
        policy.backward_chunks(rounds, chunk, in.leftCols(d_value()), delta.data(), m.data(),
                               z.data(), g.leftCols(d_key()), g.middleCols(d_key(), d_key()),
                               g.rightCols(d_value()), owns, ws);
      });
    }
    bytes_sent_ += exchange_.exchange(send_, fwidth, true, recv_);  // d_out: no longer needed
    const std::vector<S>& back = recv_;

    // Each local row sums its gradients, then through the scale and the key normalisation.
    dq.setZero();
    dk.setZero();
    dv.setZero();
    parallel_for(problems, threads_, [&](Index problem, int slot) {
      const Index b = problem / h, head = problem % h, at = b * local_length();
      auto rows_of = [&](auto& m, Index w) { return m.block(at, head * w, local_length(), w); };
      View<S> g_q = rows_of(dq, d_key()), g_k = rows_of(dk, d_key()), g_v = rows_of(dv, d_value());
      exchange_.for_each_returned(
          std::size_t(problem), fwidth, back.data(), [&](Index row, const S* r) {
            g_q.row(row) += Eigen::Map<const RowVector<S>>(r, d_key());
            g_k.row(row) += Eigen::Map<const RowVector<S>>(r + d_key(), d_key());
            g_v.row(row) += Eigen::Map<const RowVector<S>>(r + 2 * d_key(), d_value());
          });
      Workspace& ws = pool_[slot];
      Workspace::Frame frame(ws);
      const ConstView<S> keys = rows_of(k, d_key());
      policy.finish_gradients(keys, effattn::detail::lsh::inverse_norms(keys, local_length(), ws),
                              local_length(), g_q, g_k);
    });
  }

 private:
  // One sequence and head.
  struct Problem {
    Index valid = 0;
    std::vector<detail::RoundPlan> plans;      // each round's buckets and chunks (then in chunks)
    std::vector<std::int32_t> bucket, sorted;  // rounds × local rows (sorted −1: padding)
    detail::RankChunks chunks;                 // this rank's chunks of every round
    std::vector<std::int32_t> row_of;          // local id → fetched row
    std::vector<S> max, log_sum;               // local rows: log-sum-exp of the forward
    std::size_t bytes() const {
      return chunks.bytes() + sizeof(std::int32_t) * row_of.size() +
             sizeof(S) * (max.size() + log_sum.size());
    }
  };

  Index d_key() const { return layout().d_key; }
  Index d_value() const { return layout().d_value; }
  int ranks() const { return call_.comm().size(); }
  // A fetched row: k | q | v, or k | v when the keys are the queries.
  Index fetched_width() const { return (shared_qk_ ? 1 : 2) * d_key() + d_value(); }
  int me() const { return call_.comm().rank(); }

  template <class M>
  static void copy_row(const M& m, Index row, Index col, Index count, S* to) {
    Eigen::Map<RowVector<S>>(to, count) = m.row(row).segment(col, count);
  }

  // Steps 1 and 2: hash this rank's rows; the bucket counts; each valid row's sorted index.
  void sort(const Policy& policy, ConstView<S> k) {
    const Index n = shards().total(), n_r = local_length(), r = policy.config().rounds;
    const Index h = layout().heads, Q = Index(problems_.size());
    const auto plan = policy.plan(n);
    const Index b = plan.buckets;
    const std::size_t P = std::size_t(ranks());
    auto valid_row = [&](const Problem& p, Index row) {
      return position_[std::size_t(row)] < p.valid;
    };
    std::vector<std::int32_t> counts(std::size_t(Q * r * b), 0);
    parallel_for(Q, threads_, [&](Index problem, int slot) {
      Problem& p = problems_[std::size_t(problem)];
      const Index seq = problem / h, head = problem % h;
      p.bucket.resize(std::size_t(r * n_r));
      effattn::detail::lsh::hash_keys<S>(
          k.block(seq * n_r, head * d_key(), n_r, d_key()), n_r, r, plan,
          [&](Index round, Index columns, auto&& dst) {
            policy.copy_rotation(head, round, columns, dst);
          },
          p.bucket.data(), pool_[slot]);
      for (Index round = 0; round < r; ++round)
        for (Index row = 0; row < n_r; ++row)
          if (valid_row(p, row))
            ++counts[std::size_t((problem * r + round) * b +
                                 p.bucket[std::size_t(round * n_r + row)])];
    });
    call_.comm().all_reduce(counts.data(), counts.size());
    if (P > 1) bytes_sent_ += sizeof(std::int32_t) * counts.size();
    for (Index problem = 0; problem < Q; ++problem) {
      Problem& p = problems_[std::size_t(problem)];
      for (Index round = 0; round < r; ++round)
        p.plans.emplace_back(&counts[std::size_t((problem * r + round) * b)], b,
                             policy.config().chunk, p.valid, causal);
    }

    // Each valid row's sorted index in every round.
    std::vector<std::vector<std::int32_t>> buckets(std::size_t(Q * r)), positions(buckets.size());
    for (Index problem = 0; problem < Q; ++problem) {
      const Problem& p = problems_[std::size_t(problem)];
      for (Index round = 0; round < r; ++round)
        for (Index row = 0; row < n_r; ++row)
          if (valid_row(p, row)) {
            buckets[std::size_t(problem * r + round)].push_back(
                p.bucket[std::size_t(round * n_r + row)]);
            positions[std::size_t(problem * r + round)].push_back(position_[std::size_t(row)]);
          }
    }
    const std::vector<std::vector<std::int32_t>> sorted = detail::distributed_sort(
        call_.comm(), buckets, positions, b,
        [&](Index task, std::int64_t bucket) {
          return problems_[std::size_t(task / r)]
              .plans[std::size_t(task % r)]
              .start[std::size_t(bucket)];
        },
        threads_, bytes_sent_);
    for (Index problem = 0; problem < Q; ++problem) {
      Problem& p = problems_[std::size_t(problem)];
      p.sorted.assign(std::size_t(r * n_r), -1);
      for (Index round = 0; round < r; ++round) {
        std::size_t i = 0;
        for (Index row = 0; row < n_r; ++row)
          if (valid_row(p, row))
            p.sorted[std::size_t(round * n_r + row)] =
                sorted[std::size_t(problem * r + round)][i++];
      }
    }
  }

  // Step 3: the ranks each valid row goes to (those whose chunks' windows hold it in some
  // round), each once.
  void plan_sends(const Policy& policy) {
    parallel_for(Index(problems_.size()), threads_, [&](Index problem, int) {
      const Problem& p = problems_[std::size_t(problem)];
      detail::RowExchange::Lists& lists = exchange_[std::size_t(problem)];
      detail::destinations(policy.config(), p.plans, p.sorted, p.bucket, local_length(), p.valid,
                           ranks(), lists.sent, lists.sent_count);
    });
    bytes_sent_ += exchange_.agree();
  }

  // Step 3 on the receiving side: every fetched token's position, sorted index and bucket in
  // each round; local ids in position order; this rank's chunks.
  void receive_tokens(const Policy& policy) {
    const Index n_r = local_length(), r = policy.config().rounds, width = 1 + 2 * r;
    std::vector<std::int32_t> out, in;
    exchange_.pack(out, width, threads_, [&](Index problem, Index row, std::int32_t* to) {
      const Problem& p = problems_[std::size_t(problem)];
      to[0] = position_[std::size_t(row)];
      for (Index round = 0; round < r; ++round) {
        to[1 + 2 * round] = p.sorted[std::size_t(round * n_r + row)];
        to[2 + 2 * round] = p.bucket[std::size_t(round * n_r + row)];
      }
    });
    bytes_sent_ += exchange_.exchange(out, width, false, in);
    parallel_for(Index(problems_.size()), threads_, [&](Index problem, int) {
      Problem& p = problems_[std::size_t(problem)];
      const detail::RowExchange::Lists& lists = exchange_[std::size_t(problem)];
      std::vector<std::pair<std::int32_t, std::int32_t>> tokens;  // (position, fetched row)
      for (std::size_t src = 0; src < lists.received_count.size(); ++src) {
        const Index first = exchange_.first_row(src, std::size_t(problem));
        for (std::size_t i = 0; i < lists.received_count[src]; ++i)
          tokens.emplace_back(in[std::size_t((first + Index(i)) * width)],
                              static_cast<std::int32_t>(first + Index(i)));
      }
      std::vector<std::int32_t> sorted, bucket;
      detail::number_tokens(tokens, in.data(), r, p.row_of, sorted, bucket);
      const Index valid = p.valid;
      p.chunks = detail::RankChunks(
          policy.config(), causal, std::move(p.plans), Index(tokens.size()), sorted,
          std::move(bucket), me(),
          [&](Index, Index first) { return detail::chunk_rank(first, valid, ranks()); });
    });
  }

  // Calls loop(problem, rounds, chunk, owns, workspace) for every sequence and head (in
  // parallel): this rank's chunks of it, a chunk gathering from the fetched q | k | v rows,
  // and owns(round, ci) choosing the chunks this rank computes.
  template <class Loop>
  void on_fetched_chunks(const Policy& policy, Loop&& loop) {
    const Index fetched = exchange_.received_rows();
    // A rank that fetched no rows still maps one row's memory: its column blocks must not
    // offset a null pointer.
    if (rows_.size() < std::size_t(fetched_width())) rows_.resize(std::size_t(fetched_width()));
    const ConstView<S> rows = Eigen::Map<const Matrix<S>>(rows_.data(), fetched, fetched_width());
    const ConstView<S> keys = rows.leftCols(d_key()), values = rows.rightCols(d_value());
    const ConstView<S> queries = shared_qk_ ? keys : rows.middleCols(d_key(), d_key());
    std::vector<S> inv_norm(static_cast<std::size_t>(fetched));
    for (Index i = 0; i < fetched; ++i) {
      const S norm = keys.row(i).norm();
      inv_norm[std::size_t(i)] = norm > S(0) ? S(1) / norm : S(0);
    }
    parallel_for(Index(problems_.size()), threads_, [&](Index problem, int slot) {
      Problem& p = problems_[std::size_t(problem)];
      Workspace& ws = pool_[slot];
      Workspace::Frame frame(ws);
      typename Policy::Chunk chunk(policy.config(), policy.scale(d_key()), queries, keys, values,
                                   inv_norm.data(), ws);
      chunk.rows_from(p.row_of.data());
      detail::RankChunks& rounds = p.chunks;
      loop(
          problem, rounds, chunk, [&rounds](Index, Index ci) { return rounds.owned(ci); }, ws);
    });
  }

  void prepare(const Policy& policy) {
    using W = Workspace;
    threads_ = max_threads();
    pool_.resize(threads_);
    const Index n = shards().total(), r = policy.config().rounds;
    const Index dk = d_key(), dv = d_value();
    pool_.reserve_each(
        std::max({effattn::detail::lsh::hashing_bytes<S>(local_length(), dk, r, policy.plan(n)),
                  W::bytes_for<S>(local_length()), policy.chunk_loop_bytes(n, dk, dv)}));
  }

  detail::ShardedCall call_;
  std::vector<std::int32_t> position_;  // this rank's local rows: their positions
  std::vector<Problem> problems_;
  detail::RowExchange exchange_;
  std::vector<S> rows_;         // the fetched q | k | v rows
  std::vector<S> send_, recv_;  // messages
  WorkspacePool pool_;
  int threads_ = 1;
  bool kept_ = false, shared_qk_ = false;
  SequenceShape last_{};
  std::size_t bytes_sent_ = 0;
};

}  // namespace effattn::mpi

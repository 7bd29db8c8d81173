#pragma once
// ShardedLSH: Reformer's LSH attention over a sequence sharded across MPI ranks: the hashed,
// sorted chunks are shared out among the ranks, which fetch the rows their chunks need.

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
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/core/workspace_pool.hpp"
#include "effattn/mpi/communicator.hpp"
#include "effattn/mpi/detail/sharded_call.hpp"
#include "effattn/mpi/sequence_shards.hpp"

namespace effattn::mpi {

/// Sequence-parallel LSH attention (LSHAttention<S>, Reformer). Each rank holds the rows of
/// its shard of every sequence (q, k [batch·n_r × heads·d_key], v, out [batch·n_r ×
/// heads·d_value]); per sequence and head:
///
///  1. every rank hashes its own keys (the policy's rotations) and one all-gather of the
///     bucket ids (rounds int32 per token) gives every rank every round's buckets; each rank
///     then sorts by (bucket, position) and cuts the chunks itself, as one process would;
///  2. the sorted order of each round is shared out: the chunk starting at sorted index s
///     belongs to rank ⌊s·P / valid⌋, so every rank runs about 1/P of each round's queries;
///  3. each rank lists the tokens its chunks and their look-back / look-forward windows need
///     (the halo included); an all-to-all of these lists (int32 positions), then one of the
///     q, k, v rows, brings them from the ranks that hold them;
///  4. each rank runs the policy's own chunk loop (LSHAttention::forward_chunks) on them,
///     keeping every query's running max, sum and weighted values over its rounds;
///  5. one all-to-all returns these to the tokens' ranks, which combine them by log-sum-exp.
///
/// Backward mirrors it: the tokens' ranks send d_out and each row's log-sum-exp (with
/// dO·O), the chunks' ranks run LSHAttention::backward_chunks and return the gradients of
/// q, k̂ and v, which the tokens' ranks sum and carry through the key normalisation. The
/// result is what AttentionCore<LSHAttention<S>> computes on the whole sequences (the same
/// rotations, buckets and chunks), up to rounding; causal, padding at the end of the whole
/// sequence, dedup, same_bucket and look_forward as there. Any shards.
///
/// Costs per rank: the attention's work divided by P (rows per round; buckets may make it
/// uneven); rows sent ≈ rounds · (1 + look_back + look_forward) · n/P · (2·d_key + d_value)
/// values each way, and the bucket ids. Every rank also holds every round's buckets and
/// order of the whole sequence (O(rounds · n) int32 per sequence and head, kept for
/// backward) and sorts them: linear, small beside the attention until P approaches the
/// chunk's work per token. The policy's work() counts this rank's share. Forward keeps the fetched
/// rows for backward. Every rank must pass the same LSHAttention (the same rotations). A call some
/// rank rejects throws on every rank before any data moves.
template <class S, class Masking = Bidirectional>
class ShardedLSH {
  static_assert(effattn::detail::assert_masking<Masking>());

 public:
  using Scalar = S;
  using Policy = LSHAttention<S>;
  static constexpr bool causal = Masking::causal;

  ShardedLSH(HeadLayout layout, Communicator comm, SequenceShards shards)
      : call_("mpi::ShardedLSH", layout, comm, std::move(shards)) {
    const Index n = call_.shards().total();
    effattn::detail::require(n <= std::numeric_limits<std::int32_t>::max(), call_.who(), "shards",
                             n, "at most 2^31 − 1 positions per sequence");
    owner_.resize(std::size_t(n));
    local_row_.resize(std::size_t(n));
    for (int r = 0; r < call_.comm().size(); ++r) {
      Index row = 0;
      for (const Segment& s : call_.shards().segments(r))
        for (Index i = 0; i < s.length; ++i, ++row) {
          owner_[std::size_t(s.offset + i)] = r;
          local_row_[std::size_t(s.offset + i)] = static_cast<std::int32_t>(row);
        }
    }
  }

  const SequenceShards& shards() const { return call_.shards(); }
  const HeadLayout& layout() const { return call_.layout(); }
  Index local_length() const { return call_.local_length(); }
  /// Values this rank has handed to MPI since construction, in bytes (not counting what it
  /// sends itself; an all-gather counts this rank's part once).
  std::size_t bytes_sent() const { return bytes_sent_; }
  bool kept_for(const SequenceShape& shape) const {
    return kept_ && detail::ShardedCall::same_shape(shape, last_);
  }
  void release_saved() {
    problems_ = {};
    rows_ = {};
    kept_ = false;
    last_ = {};
  }
  /// What a forward keeps for backward: every round's buckets and order, the maps of the
  /// fetched rows and the rows themselves, and each local row's log-sum-exp.
  std::size_t saved_bytes() const {
    if (!kept_) return 0;
    std::size_t bytes = sizeof(S) * std::size_t(rows_.size());
    for (const Problem& p : problems_)
      bytes += p.bytes();
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
    hash_and_sort(policy, k, shape, valid);
    plan_exchange(policy);

    // The rows each rank's chunks need: q | k | v.
    const Index width = 2 * d_key() + d_value();
    pack(width, [&](Index problem, Index row, S* to) {
      const Index b = problem / h, head = problem % h, at = b * local_length() + row;
      copy_row(q, at, head * d_key(), d_key(), to);
      copy_row(k, at, head * d_key(), d_key(), to + d_key());
      copy_row(v, at, head * d_value(), d_value(), to + 2 * d_key());
    });
    exchange(width, false, rows_);

    // This rank's chunks: running max, sum and Σ exp(logit − max)·v of every fetched query.
    const Index fetched = received_rows();
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
    exchange(d_value() + 2, true, recv_);
    const std::vector<S>& back = recv_;

    // Each local row combines its partial results by log-sum-exp.
    out.setZero();
    parallel_for(problems, threads_, [&](Index problem, int) {
      Problem& p = problems_[std::size_t(problem)];
      const Index b = problem / h, head = problem % h;
      p.max.assign(std::size_t(local_length()), -std::numeric_limits<S>::infinity());
      p.log_sum.assign(std::size_t(local_length()), S(0));
      for_each_sent(problem, d_value() + 2, back.data(), [&](Index row, const S* r) {
        S& m = p.max[std::size_t(row)];
        S& z = p.log_sum[std::size_t(row)];
        const S m_part = r[d_value()], z_part = r[d_value() + 1];
        if (z_part == S(0)) return;
        auto o = out.row(b * local_length() + row).segment(head * d_value(), d_value());
        const Eigen::Map<const RowVector<S>> o_part(r, d_value());
        if (m_part > m) {
          const S f = std::exp(m - m_part);
          o = f * o + o_part;
          z = f * z + z_part;
          m = m_part;
        } else {
          const S f = std::exp(m_part - m);
          o += f * o_part;
          z += f * z_part;
        }
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
    pack(width, [&](Index problem, Index row, S* to) {
      const Problem& p = problems_[std::size_t(problem)];
      const Index b = problem / h, head = problem % h, at = b * local_length() + row;
      copy_row(d_out, at, head * d_value(), d_value(), to);
      to[d_value()] = p.max[std::size_t(row)];
      to[d_value() + 1] = p.log_sum[std::size_t(row)];
      to[d_value() + 2] = d_out.row(at)
                              .segment(head * d_value(), d_value())
                              .dot(out.row(at).segment(head * d_value(), d_value()));
    });
    exchange(width, false, recv_);
    const std::vector<S>& grads_in = recv_;

    // This rank's chunks: gradients of the fetched rows' q, k̂ and v.
    const Index fetched = received_rows(), fwidth = 2 * d_key() + d_value();
    send_.resize(std::size_t(fetched * fwidth));  // d_out went out: reuse
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
    exchange(fwidth, true, recv_);  // d_out and the rest are no longer needed
    const std::vector<S>& back = recv_;

    // Each local row sums its gradients, then through the scale and the key normalisation.
    dq.setZero();
    dk.setZero();
    dv.setZero();
    parallel_for(problems, threads_, [&](Index problem, int slot) {
      const Index b = problem / h, head = problem % h, at = b * local_length();
      auto rows_of = [&](auto& m, Index w) { return m.block(at, head * w, local_length(), w); };
      View<S> g_q = rows_of(dq, d_key()), g_k = rows_of(dk, d_key()), g_v = rows_of(dv, d_value());
      for_each_sent(problem, fwidth, back.data(), [&](Index row, const S* r) {
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
  // One sequence and head: the whole sequence's buckets and order, and which rows go where.
  struct Problem {
    Index valid = 0;
    std::vector<std::int32_t> bucket, order;  // rounds × n
    // Positions of this rank's tokens sent to each rank (ascending), concatenated in rank
    // order, and how many go to each; the same for the tokens received from each rank.
    std::vector<std::int32_t> sent, received;
    std::vector<std::size_t> sent_count, received_count;
    std::vector<std::int32_t> row_of;  // n: position → row of the fetched rows (−1: none)
    std::vector<S> max, log_sum;       // local rows: log-sum-exp of the forward
    std::size_t bytes() const {
      return sizeof(std::int32_t) *
                 (bucket.size() + order.size() + sent.size() + received.size() + row_of.size()) +
             sizeof(S) * (max.size() + log_sum.size());
    }
  };

  Index d_key() const { return layout().d_key; }
  Index d_value() const { return layout().d_value; }
  int ranks() const { return call_.comm().size(); }
  int me() const { return call_.comm().rank(); }

  // The rank whose chunk starts at sorted index s of a round of `valid` tokens.
  int chunk_rank(Index s, Index valid) const { return int(s * ranks() / valid); }
  // owns(round, ci) for the policy's chunk loops: the chunks of this rank.
  auto mine(const typename Policy::Rounds& rounds, Index valid) const {
    return [this, &rounds, valid](Index, Index ci) {
      return chunk_rank(rounds.first(ci), valid) == me();
    };
  }

  template <class M>
  static void copy_row(const M& m, Index row, Index col, Index count, S* to) {
    Eigen::Map<RowVector<S>>(to, count) = m.row(row).segment(col, count);
  }

  // Step 1: hash this rank's rows, gather every rank's buckets, and sort every round.
  void hash_and_sort(const Policy& policy, ConstView<S> k, const SequenceShape& shape,
                     const std::vector<Index>& valid) {
    const Index n = shards().total(), n_r = local_length(), r = policy.config().rounds;
    const Index h = layout().heads, problems = shape.batch * h;
    const auto plan = policy.plan(n);
    std::vector<std::int32_t> own(std::size_t(problems * r * n_r));
    parallel_for(problems, threads_, [&](Index problem, int slot) {
      const Index b = problem / h, head = problem % h;
      effattn::detail::lsh::hash_keys<S>(
          k.block(b * n_r, head * d_key(), n_r, d_key()), n_r, r, plan,
          [&](Index round, Index columns, auto&& dst) {
            policy.copy_rotation(head, round, columns, dst);
          },
          own.data() + problem * r * n_r, pool_[slot]);
    });
    std::vector<std::size_t> counts(static_cast<std::size_t>(ranks()));
    for (int p = 0; p < ranks(); ++p)
      counts[std::size_t(p)] = std::size_t(problems * r * shards().local_length(p));
    std::vector<std::int32_t> all(std::size_t(problems * r * n));
    call_.comm().all_gather(own.data(), counts, all.data());
    if (ranks() > 1) bytes_sent_ += sizeof(std::int32_t) * own.size();

    parallel_for(problems, threads_, [&](Index problem, int slot) {
      Problem& p = problems_[std::size_t(problem)];
      p.valid = valid[std::size_t(problem / h)];
      p.bucket.resize(std::size_t(r * n));
      p.order.resize(std::size_t(r * n));
      std::size_t from = 0;  // rank q's block: problems × rounds × its rows
      for (int q = 0; q < ranks(); ++q) {
        const Index n_q = shards().local_length(q);
        const std::int32_t* block = all.data() + from + std::size_t(problem * r * n_q);
        for (Index round = 0; round < r; ++round) {
          Index row = 0;
          for (const Segment& s : shards().segments(q))
            for (Index i = 0; i < s.length; ++i, ++row)
              p.bucket[std::size_t(round * n + s.offset + i)] = block[round * n_q + row];
        }
        from += counts[std::size_t(q)];
      }
      Workspace& ws = pool_[slot];
      Workspace::Frame frame(ws);
      Index* count = ws.take<Index>(plan.buckets + 2);
      for (Index round = 0; round < r; ++round)
        effattn::detail::lsh::sort_by_bucket(p.bucket.data() + round * n, n, p.valid, plan.buckets,
                                             p.order.data() + round * n, count);
    });
  }

  // Step 2: the tokens this rank's chunks need (their windows), listed by the rank that holds
  // them in its local order; one all-to-all of these lists tells every rank which of its rows
  // to send where. Then the row of each fetched token: from rank 0 (its rows for problem 0,
  // 1, …), then rank 1, …
  void plan_exchange(const Policy& policy) {
    const Index n = shards().total(), problems = Index(problems_.size());
    const auto P = static_cast<std::size_t>(ranks());
    parallel_for(problems, threads_, [&](Index problem, int slot) {
      Problem& p = problems_[std::size_t(problem)];
      Workspace& ws = pool_[slot];
      Workspace::Frame frame(ws);
      typename Policy::Rounds rounds =
          policy.chunking(p.order.data(), p.bucket.data(), n, p.valid, causal, ws);
      const auto owns = mine(rounds, p.valid);
      p.row_of.assign(std::size_t(n), -1);  // 0 marks a needed token until rows are numbered
      for (Index round = 0; round < policy.config().rounds; ++round) {
        rounds.select(round);
        for (Index ci = 0; ci < rounds.chunks(); ++ci)
          if (owns(round, ci))
            rounds.for_each_window_chunk(ci, [&](Index first, Index stop) {
              for (Index j = first; j < stop; ++j)
                p.row_of[std::size_t(rounds.order[j])] = 0;
            });
      }
      p.received.clear();
      p.received_count.assign(P, 0);
      for (int from = 0; from < ranks(); ++from)
        for (const Segment& s : shards().segments(from))
          for (Index t = s.offset; t < s.offset + s.length; ++t)
            if (p.row_of[std::size_t(t)] == 0) {
              p.received.push_back(static_cast<std::int32_t>(t));
              ++p.received_count[std::size_t(from)];
            }
    });
    // How many each rank wants of this one, per problem; then which.
    std::vector<std::int64_t> want(P * std::size_t(problems)), asked(want.size());
    for (std::size_t from = 0; from < P; ++from)
      for (std::size_t q = 0; q < problems_.size(); ++q)
        want[from * problems_.size() + q] = std::int64_t(problems_[q].received_count[from]);
    const std::vector<std::size_t> per_rank(P, problems_.size());
    call_.comm().all_to_all(want.data(), per_rank, asked.data(), per_rank);
    std::vector<std::size_t> to(P, 0), from(P, 0);
    for (std::size_t r = 0; r < P; ++r)
      for (std::size_t q = 0; q < problems_.size(); ++q) {
        to[r] += std::size_t(want[r * problems_.size() + q]);
        from[r] += std::size_t(asked[r * problems_.size() + q]);
      }
    std::vector<std::int32_t> lists, wanted;
    for (std::size_t r = 0; r < P; ++r)
      for (const Problem& p : problems_) {
        std::size_t at = 0;
        for (std::size_t q = 0; q < r; ++q)
          at += p.received_count[q];
        lists.insert(lists.end(), p.received.begin() + std::ptrdiff_t(at),
                     p.received.begin() + std::ptrdiff_t(at + p.received_count[r]));
      }
    std::size_t total = 0;
    for (std::size_t r = 0; r < P; ++r) {
      total += from[r];
      if (int(r) != me()) bytes_sent_ += sizeof(std::int32_t) * to[r];
    }
    wanted.resize(total);
    call_.comm().all_to_all(lists.data(), to, wanted.data(), from);
    for (Problem& p : problems_) {
      p.sent.clear();
      p.sent_count.assign(P, 0);
    }
    std::size_t at = 0;
    for (std::size_t r = 0; r < P; ++r)
      for (std::size_t q = 0; q < problems_.size(); ++q) {
        const auto count = std::size_t(asked[r * problems_.size() + q]);
        Problem& p = problems_[q];
        p.sent.insert(p.sent.end(), wanted.begin() + std::ptrdiff_t(at),
                      wanted.begin() + std::ptrdiff_t(at + count));
        p.sent_count[r] = count;
        at += count;
      }
    Index row = 0;
    for (int source = 0; source < ranks(); ++source)
      for (Problem& p : problems_) {
        std::size_t first = 0;
        for (int q = 0; q < source; ++q)
          first += p.received_count[std::size_t(q)];
        for (std::size_t i = 0; i < p.received_count[std::size_t(source)]; ++i)
          p.row_of[std::size_t(p.received[first + i])] = static_cast<std::int32_t>(row++);
      }
  }

  // Calls loop(problem, rounds, chunk, owns, workspace) for every sequence and head (in
  // parallel): its rounds cut into chunks, a chunk gathering from the fetched q | k | v rows,
  // and owns(round, ci) choosing this rank's chunks.
  template <class Loop>
  void on_fetched_chunks(const Policy& policy, Loop&& loop) {
    const Index n = shards().total(), fetched = received_rows();
    const ConstView<S> rows = fetched_rows(2 * d_key() + d_value());
    std::vector<S> inv_norm(static_cast<std::size_t>(fetched));
    for (Index i = 0; i < fetched; ++i) {
      const S norm = rows.row(i).segment(d_key(), d_key()).norm();
      inv_norm[std::size_t(i)] = norm > S(0) ? S(1) / norm : S(0);
    }
    parallel_for(Index(problems_.size()), threads_, [&](Index problem, int slot) {
      const Problem& p = problems_[std::size_t(problem)];
      Workspace& ws = pool_[slot];
      Workspace::Frame frame(ws);
      typename Policy::Rounds rounds =
          policy.chunking(p.order.data(), p.bucket.data(), n, p.valid, causal, ws);
      typename Policy::Chunk chunk(policy.config(), policy.scale(d_key()), rows.leftCols(d_key()),
                                   rows.middleCols(d_key(), d_key()), rows.rightCols(d_value()),
                                   inv_norm.data(), ws);
      chunk.rows_from(p.row_of.data());
      loop(problem, rounds, chunk, mine(rounds, p.valid), ws);
    });
  }

  Index received_rows() const {
    Index rows = 0;
    for (const Problem& p : problems_)
      rows += Index(p.received.size());
    return rows;
  }
  ConstView<S> fetched_rows(Index width) const {
    return Eigen::Map<const Matrix<S>>(rows_.data(), received_rows(), width);
  }

  // Into send_: rows of `width` values for every token this rank sends, by destination then
  // problem; fill(problem, local row, to) writes one.
  template <class Fill>
  void pack(Index width, Fill&& fill) {
    std::vector<std::size_t> start(problems_.size() * std::size_t(ranks()));
    std::size_t rows = 0;
    for (int to = 0; to < ranks(); ++to)
      for (std::size_t problem = 0; problem < problems_.size(); ++problem) {
        start[std::size_t(to) * problems_.size() + problem] = rows;
        rows += problems_[problem].sent_count[std::size_t(to)];
      }
    send_.resize(rows * std::size_t(width));
    S* buffer = send_.data();
    parallel_for(Index(problems_.size()), threads_, [&](Index problem, int) {
      const Problem& p = problems_[std::size_t(problem)];
      std::size_t i = 0;
      for (int to = 0; to < ranks(); ++to) {
        std::size_t row = start[std::size_t(to) * problems_.size() + std::size_t(problem)];
        for (std::size_t c = 0; c < p.sent_count[std::size_t(to)]; ++c, ++i, ++row)
          fill(problem, Index(local_row_[std::size_t(p.sent[i])]), buffer + row * width);
      }
    });
  }

  // Calls f(local row, values) for every row that came back from the ranks this rank sent to
  // (exchange(…, true) of rows of `width`), in rank order.
  template <class F>
  void for_each_sent(Index problem, Index width, const S* back, F&& f) const {
    std::size_t row = 0, i = 0;
    const Problem& p = problems_[std::size_t(problem)];
    for (int to = 0; to < ranks(); ++to)
      for (std::size_t q = 0; q < problems_.size(); ++q) {
        const std::size_t count = problems_[q].sent_count[std::size_t(to)];
        if (q == std::size_t(problem))
          for (std::size_t c = 0; c < count; ++c, ++i)
            f(Index(local_row_[std::size_t(p.sent[i])]), back + (row + c) * std::size_t(width));
        row += count;
      }
  }

  // One all-to-all of send_'s rows of `width` into `into`: this rank's rows to the chunks'
  // ranks, or (`back`) the fetched rows' results to the tokens' ranks.
  void exchange(Index width, bool back, std::vector<S>& into) {
    std::vector<std::size_t> to(std::size_t(ranks()), 0), from(std::size_t(ranks()), 0);
    for (const Problem& p : problems_)
      for (int q = 0; q < ranks(); ++q) {
        to[std::size_t(q)] += (back ? p.received_count : p.sent_count)[std::size_t(q)];
        from[std::size_t(q)] += (back ? p.sent_count : p.received_count)[std::size_t(q)];
      }
    std::size_t total = 0;
    for (int q = 0; q < ranks(); ++q) {
      to[std::size_t(q)] *= std::size_t(width);
      from[std::size_t(q)] *= std::size_t(width);
      total += from[std::size_t(q)];
      if (q != me()) bytes_sent_ += sizeof(S) * to[std::size_t(q)];
    }
    into.resize(total);
    call_.comm().all_to_all(send_.data(), to, into.data(), from);
  }

  void prepare(const Policy& policy) {
    using W = Workspace;
    threads_ = max_threads();
    pool_.resize(threads_);
    const Index n = shards().total(), r = policy.config().rounds;
    const Index c = std::min(policy.config().chunk, n), w = policy.config().window(n);
    const Index dk = d_key(), dv = d_value();
    const auto plan = policy.plan(n);
    const std::size_t chunks = W::bytes_for<std::int32_t>(
        effattn::detail::lsh::max_chunks(n, policy.config().chunk, plan.buckets) + 1);
    const std::size_t rounds =
        chunks + (policy.config().dedup ? W::bytes_for<std::int32_t>(r * n) : 0);
    const std::size_t loops = W::bytes_for<S>(c * dv) + W::bytes_for<S>(c * w) +
                              W::bytes_for<S>(w * dv) + W::bytes_for<S>(c * dk) +
                              W::bytes_for<S>(w * dk) + W::bytes_for<S>(c);
    pool_.reserve_each(
        std::max({effattn::detail::lsh::hashing_bytes<S>(local_length(), dk, r, plan),
                  W::bytes_for<Index>(plan.buckets + 2), W::bytes_for<S>(local_length()),
                  rounds + Policy::Chunk::bytes(c, w, dk, dv) + loops}));
  }

  detail::ShardedCall call_;
  std::vector<std::int32_t> owner_, local_row_;  // per position: its rank, its row there
  std::vector<Problem> problems_;
  std::vector<S> rows_;         // the fetched q | k | v rows
  std::vector<S> send_, recv_;  // messages
  WorkspacePool pool_;
  int threads_ = 1;
  bool kept_ = false;
  SequenceShape last_{};
  std::size_t bytes_sent_ = 0;
};

}  // namespace effattn::mpi

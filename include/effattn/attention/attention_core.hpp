#pragma once
// AttentionCore: a policy run over every (sequence, head) of projected Q, K, V.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "effattn/attention/attention_policy.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/core/aliasing.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/instance.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/core/workspace_pool.hpp"

namespace effattn {

namespace detail {
/// A policy's DecodeState, or a placeholder for a policy that cannot decode (AttentionCore's
/// start_decoding then says so).
template <class Policy>
struct DecodeStateOf {
  struct type {
    std::size_t bytes() const { return 0; }
  };
};
template <class Policy>
requires requires {
  typename Policy::DecodeState;
}
struct DecodeStateOf<Policy> {
  using type = typename Policy::DecodeState;
};
}  // namespace detail

/// The attention between projections: for every sequence b and head h,
///   out[b, :, h] = Policy(q[b, :, h], k[b, :, h], v[b, :, h]),
/// where q, k are [batch·n × heads·d_key], v and out [batch·n × heads·d_value] and a head
/// is a column block. (sequence, head) problems run in parallel, and so do the blocks of one
/// head where the policy splits it (see "blocks" in attention_policy.hpp: Full's backward over
/// key tiles and its decoding over cache blocks, Favor's bidirectional key sums and queries);
/// when there are fewer problems than twice the threads and the policy allows it, a head's
/// queries are split into slices of whole query tiles. Blocks are fixed rows of the sequence and
/// merge in block order, so every result has the same bits at any thread count. Each thread's
/// scratch comes from a workspace planned with Policy::scratch_bytes before the parallel region,
/// and what one problem's blocks share from memory sized before it too. With keep_saved, forward
/// keeps the policy's Saved state of every problem for backward. MultiHeadAttention is this plus
/// the four projections; use it directly when you project yourself.
template <class Policy, class Masking = Bidirectional>
class AttentionCore {
  static_assert(detail::assert_attention_policy<Policy>());
  static_assert(detail::assert_optional_parts<Policy>());
  static_assert(detail::assert_masking<Masking>());
  // sizeof instantiates the check, whose own static_assert gives the message.
  static_assert(
      sizeof(detail::MaskingCheck<
             Policy, std::conditional_t<detail::is_masking<Masking>, Masking, Bidirectional>>) > 0);

 public:
  using Scalar = typename Policy::Scalar;
  using S = Scalar;
  static constexpr bool causal = Masking::causal;

  /// `masking` holds a window's size where the masking type leaves it to run time
  /// (CausalWindow<>{512}); other maskings are empty values.
  AttentionCore(typename Policy::Config config, HeadLayout layout, Masking masking = {})
      : layout_(check_layout(layout)), policy_(config, layout), masking_(masking) {
    detail::check_masking(masking_, "AttentionCore");
    // A policy that fits its tiles to a window (FullAttention) is told the masking's.
    if constexpr (PolicyUsesWindow<Policy>) policy_.use_window(masking_.keys());
  }

  const Masking& masking() const { return masking_; }

  const HeadLayout& layout() const { return layout_; }
  Policy& policy() { return policy_; }
  const Policy& policy() const { return policy_; }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
               const SequenceShape& q_shape, const SequenceShape& kv_shape, bool keep_saved) {
    const auto scope = in_use_.enter("AttentionCore");
    check(q, k, v, q_shape, kv_shape);
    check_size(out, q.rows(), layout_.heads * layout_.d_value, "out");
    for (auto [name, m] : {std::pair{"q", q}, {"k", k}, {"v", v}})
      detail::require_disjoint("AttentionCore", "out", out, name, m);
    const Index n_q = q_shape.seq, n_k = kv_shape.seq, h = layout_.heads;
    const Index dk = layout_.d_key, dv = layout_.d_value, group = layout_.group();
    policy_.validate(n_q, n_k, dk, dv, causal);

    const int threads = max_threads();
    const Index problems = q_shape.batch * h;
    // Slices are whole query tiles of the policy (query_grain), so that every row is computed
    // in the same tile as without the split: the same bits for every thread count.
    Index grain = min_split_rows;
    if constexpr (PolicyHasQueryGrain<Policy>)
      grain = std::max<Index>(grain, policy_.query_grain(dk, dv));
    Index slice = n_q;
    if constexpr (Policy::splits_queries) {
      if (problems < 2 * threads) {
        const Index want = (2 * threads + problems - 1) / problems;
        const Index splits = std::max<Index>(1, std::min(want, n_q / grain));
        slice = ((n_q + splits - 1) / splits + grain - 1) / grain * grain;
      }
    }
    const Index splits = (n_q + slice - 1) / slice;
    saved_.clear();
    if (keep_saved) {
      saved_.reserve(static_cast<std::size_t>(problems));
      for (Index p = 0; p < problems; ++p) {
        if constexpr (PolicySavesPerHead<Policy>)
          saved_.push_back(policy_.make_saved(n_q, n_k, p % h));
        else
          saved_.push_back(policy_.make_saved(n_q, n_k));
      }
    }
    pool_.resize(threads);
    pool_.reserve_each(policy_.scratch_bytes(slice, n_k, dk, dv));

    // A policy whose forward runs in blocks (Favor: key sums over key blocks, merged in block
    // order, then query blocks) gets every (problem, block) as a task, block-major, and a share
    // of memory per problem for what its blocks merge.
    constexpr bool blocked = PolicyForwardsInBlocks<Policy>;
    if constexpr (blocked) {
      const Index spread = std::max<Index>(1, threads / problems);
      const Index blocks =
          std::max<Index>(1, policy_.forward_blocks(n_q, n_k, dk, dv, causal, spread));
      const Shared sh = share_blocks(problems, blocks, shared_scalars(n_q, n_k, dk, dv),
                                     policy_.scratch_bytes(n_q, n_k, dk, dv));
      Workspace::Frame shared_frame(shared_);
      Scalar* const shared = sh.take(shared_, problems);
      run_blocks(problems, blocks, threads,
                 [&](Index problem, Index block, int slot, const detail::StepOrder& order) {
                   const Index b = problem / h, head = problem % h;
                   auto* saved = keep_saved ? &saved_[static_cast<std::size_t>(problem)] : nullptr;
                   HeadContext ctx = context(b, head, 0, q_shape, kv_shape);
                   ctx.spread = spread;
                   Workspace& ws = pool_[slot];
                   Workspace::Frame frame(ws);
                   const Index g = head / group;  // its key/value head
                   policy_.forward_block(block, q.block(b * n_q, head * dk, n_q, dk),
                                         k.block(b * n_k, g * dk, n_k, dk),
                                         v.block(b * n_k, g * dv, n_k, dv),
                                         out.block(b * n_q, head * dv, n_q, dv), saved, ctx, ws,
                                         order, sh.of(shared, problem, ws));
                 });
    } else {
      last_tasks_ = problems * splits;
      parallel_for(problems * splits, threads, [&](Index task, int slot) {
        // Causal slices later in the sequence see more keys: the heaviest go first, so that
        // the light ones fill in at the end.
        const Index part = causal ? splits - 1 - task % splits : task % splits;
        const Index problem = task / splits, q0 = part * slice;
        const Index b = problem / h, head = problem % h, rows = std::min(slice, n_q - q0);
        if (rows <= 0) return;
        auto* saved = keep_saved ? &saved_[static_cast<std::size_t>(problem)] : nullptr;
        const Index g = head / group;
        policy_.forward(q.block(b * n_q + q0, head * dk, rows, dk),
                        k.block(b * n_k, g * dk, n_k, dk), v.block(b * n_k, g * dv, n_k, dv),
                        out.block(b * n_q + q0, head * dv, rows, dv), saved,
                        context(b, head, q0, q_shape, kv_shape), pool_[slot]);
      });
    }
    last_ = keep_saved ? Last{q_shape, kv_shape} : Last{};
  }

  /// Backward of the last forward that kept its state, on the same q, k, v, out:
  /// overwrites dq, dk, dv.
  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, View<S> dq, View<S> dk, View<S> dv,
                const SequenceShape& q_shape, const SequenceShape& kv_shape) {
    const auto scope = in_use_.enter("AttentionCore");
    check(q, k, v, q_shape, kv_shape);
    check_backward(q_shape, kv_shape);
    const Index n_q = q_shape.seq, n_k = kv_shape.seq, h = layout_.heads;
    const Index dkw = layout_.d_key, dvw = layout_.d_value, group = layout_.group();
    check_size(out, q.rows(), h * dvw, "out");
    check_size(d_out, q.rows(), h * dvw, "d_out");
    check_size(dq, q.rows(), h * dkw, "dq");
    check_size(dk, k.rows(), layout_.kv() * dkw, "dk");
    check_size(dv, v.rows(), layout_.kv() * dvw, "dv");
    for (auto [name, m] : {std::pair{"q", q}, {"k", k}, {"v", v}, {"out", out}, {"d_out", d_out}}) {
      detail::require_disjoint("AttentionCore", "dq", dq, name, m);
      detail::require_disjoint("AttentionCore", "dk", dk, name, m);
      detail::require_disjoint("AttentionCore", "dv", dv, name, m);
    }
    detail::require_disjoint("AttentionCore", "dq", dq, "dk", dk);
    detail::require_disjoint("AttentionCore", "dq", dq, "dv", dv);
    detail::require_disjoint("AttentionCore", "dk", dk, "dv", dv);

    const int threads = max_threads();
    pool_.resize(threads);
    pool_.reserve_each(policy_.scratch_bytes(n_q, n_k, dkw, dvw));
    // Grouped query heads (GQA): each query head's key and value gradients go to a part of its
    // own, summed over its group in head order afterwards (sum_group_parts): no two tasks write
    // the same rows, and the bits do not depend on the thread count.
    if (group > 1) {
      dk_parts_.resize(k.rows(), h * dkw);
      dv_parts_.resize(v.rows(), h * dvw);
    }
    const auto grad = [&](View<S> whole, Matrix<S>& parts, Index b, Index head, Index w) {
      return group > 1 ? View<S>(parts.block(b * n_k, head * w, n_k, w))
                       : View<S>(whole.block(b * n_k, head * w, n_k, w));
    };
    // A policy whose backward runs in blocks (FullAttention: key blocks) has each problem's
    // blocks merge their shared result in block order: the same bits for every thread count.
    constexpr bool blocked = PolicyBackwardsInBlocks<Policy>;
    // A blocked policy may finish with a stage over all problems together (LowRank: the
    // projections, whose gradients every problem adds to), which reads what each problem's
    // blocks shared.
    constexpr bool finishes = PolicyFinishesBackward<Policy>;
    const Index problems = q_shape.batch * h;
    const Index spread = std::max<Index>(1, threads / problems);
    Index blocks = 1;
    if constexpr (blocked)
      blocks = std::max<Index>(1, policy_.backward_blocks(n_q, n_k, dkw, dvw, causal, spread));
    const Shared sh =
        share_blocks(problems, blocks, blocked ? shared_scalars(n_q, n_k, dkw, dvw) : 0,
                     policy_.scratch_bytes(n_q, n_k, dkw, dvw), !finishes);
    Workspace::Frame shared_frame(shared_);
    Scalar* const shared = sh.take(shared_, problems);
    const auto run = [&](Index problem, Index block, int slot, const auto& order) {
      (void)block;  // a policy without blocks has one, and no order
      (void)order;
      const Index b = problem / h, head = problem % h;
      const Index g = head / group;  // its key/value head
      const auto qb = [&](auto& m, Index w) { return m.block(b * n_q, head * w, n_q, w); };
      const auto kb = [&](auto& m, Index w) { return m.block(b * n_k, g * w, n_k, w); };
      const View<S> dkh = grad(dk, dk_parts_, b, head, dkw),
                    dvh = grad(dv, dv_parts_, b, head, dvw);
      HeadContext ctx = context(b, head, 0, q_shape, kv_shape);
      ctx.spread = spread;
      const auto& saved = saved_[static_cast<std::size_t>(problem)];
      Workspace& ws = pool_[slot];
      Workspace::Frame frame(ws);
      if constexpr (blocked)
        policy_.backward_block(block, qb(q, dkw), kb(k, dkw), kb(v, dvw), qb(out, dvw),
                               qb(d_out, dvw), saved, qb(dq, dkw), dkh, dvh, ctx, ws, order,
                               sh.of(shared, problem, ws));
      else
        policy_.backward(qb(q, dkw), kb(k, dkw), kb(v, dvw), qb(out, dvw), qb(d_out, dvw), saved,
                         qb(dq, dkw), dkh, dvh, ctx, ws);
    };
    if constexpr (blocked) {
      run_blocks(problems, blocks, threads, run);
    } else {
      last_tasks_ = problems;
      parallel_for(problems, threads,
                   [&](Index problem, int slot) { run(problem, 0, slot, detail::InCallOrder{}); });
    }
    if constexpr (finishes) {
      const Index tasks = policy_.finish_backward(
          problems,
          [&](Index problem) {
            const Index b = problem / h, head = problem % h, g = head / group;
            const auto kb = [&](auto& m, Index w) { return m.block(b * n_k, g * w, n_k, w); };
            return detail::ProblemGradients<S>{kb(k, dkw),
                                               kb(v, dvw),
                                               grad(dk, dk_parts_, b, head, dkw),
                                               grad(dv, dv_parts_, b, head, dvw),
                                               context(b, head, 0, q_shape, kv_shape),
                                               shared + problem * sh.share};
          },
          threads, [&](int slot) -> Workspace& { return pool_[slot]; });
      last_tasks_ = std::max(last_tasks_, tasks);
    }
    if (group > 1) sum_group_parts(dk, dv, q_shape.batch, n_k, threads);
  }

  /// Incremental causal decoding: every (sequence, head)'s decode state (FullAttention: its
  /// keys and values so far; Favor: its recurrent state) and the tokens decoded per sequence.
  /// It records the block that made it: decode refuses any other block's decoder.
  struct Decoder {
    /// batch × heads states, or batch × kv_heads where a cache serves a group of query heads
    /// (GQA with a policy that decodes in blocks: FullAttention's cache is kv_heads / heads of
    /// the size).
    std::vector<typename detail::DecodeStateOf<Policy>::type> states;
    Index batch = 0;
    Index length = 0;         ///< tokens decoded per sequence so far
    std::uint64_t owner = 0;  ///< the identity of the block that made it
    std::size_t bytes() const {
      std::size_t b = 0;
      for (const auto& s : states)
        b += s.bytes();
      return b;
    }
  };

  /// A decoder for `batch` sequences, empty.
  Decoder start_decoding(Index batch) const {
    static_assert(can_decode,
                  "effattn: this attention policy cannot decode incrementally. FullAttention "
                  "(a key/value cache) and Favor (its recurrent state) can; LSHAttention cannot, "
                  "since a prefix is hashed, sorted and chunked differently from the whole "
                  "sequence; LowRank is never causal.");
    static_assert(causal,
                  "effattn: decoding continues a causal model: use Causal (or CausalWindow<W>) "
                  "masking");
    detail::require(batch > 0, "AttentionCore", "batch", batch, "at least 1 sequence");
    Decoder d;
    d.batch = batch;
    d.owner = id_.value();
    for (Index b = 0; b < batch; ++b)
      for (Index h = 0; h < decode_heads(); ++h) {
        d.states.push_back(policy_.decode_state(h, layout_.d_key, layout_.d_value));
        // A window's policy (FullAttention) keeps the masking's window in its state.
        if constexpr (Masking::windowed) d.states.back().window = masking_.keys();
      }
    return d;
  }

  /// The next m tokens of every sequence: q, k, v are [batch·m × heads·d] (sequence b at rows
  /// b·m …), out gets their attention over all tokens decoded so far and themselves, as the
  /// causal forward over the whole sequences would give them.
  void decode(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Decoder& d) {
    static_assert(can_decode && causal, "effattn: see start_decoding");
    constexpr const char* who = "AttentionCore";
    const auto scope = in_use_.enter(who);
    check_decode(q.rows(), d);
    const Index m = q.rows() / d.batch, h = layout_.heads;
    const Index dk = layout_.d_key, dv = layout_.d_value, kv = layout_.kv(),
                group = layout_.group();
    check_size(q, q.rows(), h * dk, "q");
    check_size(k, q.rows(), kv * dk, "k");
    check_size(v, q.rows(), kv * dv, "v");
    check_size(out, q.rows(), h * dv, "out");
    for (auto [name, mat] : {std::pair{"q", q}, {"k", k}, {"v", v}})
      detail::require_disjoint(who, "out", out, name, mat);
    const int threads = max_threads();
    pool_.resize(threads);
    const auto state = [&](Index problem) -> auto& {
      return d.states[static_cast<std::size_t>(problem)];
    };
    // Keys in each problem's cache (the same in all): a windowed cache drops what no token sees.
    const auto cached = [&] {
      if constexpr (requires { state(0).cached(); })
        return state(0).cached();
      else
        return d.length;
    };
    pool_.reserve_each(policy_.decode_scratch_bytes(m, cached(), dk, dv));
    // A policy that decodes in blocks (FullAttention: blocks of a long cache) appends the new
    // keys first, then runs every (problem, block) as a task, merging each problem's blocks in
    // block order: the same bits for every thread count.
    constexpr bool blocked = PolicyDecodesInBlocks<Policy>;
    // Under GQA a problem is a key/value head with its group of query heads, which read each
    // block of its cache once.
    if constexpr (blocked) {
      parallel_for(d.batch * kv, threads, [&](Index problem, int) {
        const Index b = problem / kv, g = problem % kv;
        policy_.decode_append(k.block(b * m, g * dk, m, dk), v.block(b * m, g * dv, m, dv),
                              state(problem));
      });
      const Index blocks = std::max<Index>(1, policy_.decode_blocks(m, cached()));
      run_blocks(d.batch * kv, blocks, threads,
                 [&](Index problem, Index block, int slot, const detail::StepOrder& order) {
                   const Index b = problem / kv, g = problem % kv;
                   policy_.decode_block(block, q.block(b * m, g * group * dk, m, group * dk),
                                        out.block(b * m, g * group * dv, m, group * dv), g * group,
                                        state(problem), pool_[slot], order);
                 });
    } else {
      last_tasks_ = d.batch * h;
      parallel_for(d.batch * h, threads, [&](Index problem, int slot) {
        const Index b = problem / h, head = problem % h, g = head / group;
        policy_.decode(q.block(b * m, head * dk, m, dk), k.block(b * m, g * dk, m, dk),
                       v.block(b * m, g * dv, m, dv), out.block(b * m, head * dv, m, dv), head,
                       state(problem), pool_[slot]);
      });
    }
    d.length += m;
  }

  /// Throws unless decode may run `rows` new tokens (m per sequence) with decoder d: one this
  /// block's start_decoding made. Changes nothing.
  void check_decode(Index rows, const Decoder& d) const {
    constexpr const char* who = "AttentionCore";
    detail::require(
        d.owner == id_.value() && static_cast<Index>(d.states.size()) == d.batch * decode_heads(),
        who, "decoder",
        d.owner == 0 ? std::string("not made by start_decoding")
                     : std::string("made by another block's start_decoding"),
        "a decoder from this block's start_decoding (decoders hold state shaped by "
        "the block that made them)");
    detail::require(rows > 0 && rows % d.batch == 0, who, "q",
                    detail::concat("a matrix of ", rows, " rows"),
                    detail::concat("m ≥ 1 new tokens for each of the ", d.batch, " sequences"));
  }

  /// Throws unless a backward with these shapes may run: a forward kept its state, on the
  /// same batch, lengths and padding (the saved state belongs to that masking). Changes nothing.
  void check_backward(const SequenceShape& q_shape, const SequenceShape& kv_shape) const {
    detail::require(!saved_.empty(), "AttentionCore", "backward",
                    "called without a forward that kept its state",
                    "a forward with keep_saved (set_training(true) on a layer), then backward");
    same_as_forward(q_shape, last_.q, "q_shape");
    same_as_forward(kv_shape, last_.kv, "kv_shape");
  }

  /// Drops the state kept for backward.
  void release_saved() {
    saved_.clear();
    saved_.shrink_to_fit();
    last_ = {};
  }
  bool has_saved() const { return !saved_.empty(); }
  std::size_t saved_bytes() const {
    std::size_t bytes = 0;
    for (const auto& s : saved_)
      bytes += s.bytes();
    return bytes;
  }

  /// Most scratch (all threads' workspaces together) any call used since reset_peak().
  std::size_t scratch_peak_bytes() const { return pool_.peak_bytes(); }
  /// Times a workspace grew past its plan: 0 unless a policy's scratch_bytes is wrong.
  std::size_t scratch_growths() const { return pool_.growths(); }
  void reset_peak() { pool_.reset_peak(); }
  /// Tasks the last forward, backward or decode handed to the threads (problems × blocks):
  /// more tasks than threads is what lets every thread work.
  Index last_tasks() const { return last_tasks_; }

 private:
  static constexpr bool can_decode = PolicyDecodes<Policy>;
  // Decode states per sequence: one per key/value head where a cache serves its group of query
  // heads (a policy that decodes in blocks), else one per query head (Favor: its features are
  // the query head's).
  Index decode_heads() const {
    return PolicyDecodesInBlocks<Policy> ? layout_.kv() : layout_.heads;
  }
  // A slice shorter than this costs more in scheduling than it gains in balance.
  static constexpr Index min_split_rows = 64;

  struct Last {
    SequenceShape q{0, 0}, kv{0, 0};
  };

  static void same_as_forward(const SequenceShape& now, const SequenceShape& then,
                              const char* name) {
    constexpr const char* who = "AttentionCore";
    const std::string arg(name);
    detail::require(now.batch == then.batch, who, arg + ".batch", now.batch,
                    detail::concat("the forward's batch, ", then.batch));
    detail::require(now.seq == then.seq, who, arg + ".seq", now.seq,
                    detail::concat("the forward's seq, ", then.seq));
    if (now.lengths.empty() && then.lengths.empty()) return;
    if (!now.lengths.empty() && static_cast<Index>(now.lengths.size()) != now.batch)
      return;  // SequenceShape::validate names that mistake
    for (Index b = 0; b < now.batch; ++b)
      detail::require(now.valid_length(b) == then.valid_length(b), who,
                      detail::concat(arg, ".lengths[", b, "]"), now.valid_length(b),
                      detail::concat("the forward's valid length, ", then.valid_length(b),
                                     " (backward needs the forward's padding)"));
  }

  // The one loop over the blocks of every problem: each (problem, block) a task, handed out
  // block-major (a block's predecessors in its problem were handed out a whole round of
  // problems earlier, and the heavy first blocks go first), ordered within its problem by a
  // StepOrder; a task that throws ends every wait.
  template <class Run>
  void run_blocks(Index problems, Index blocks, int threads, Run&& run) {
    steps_.reset(problems);
    last_tasks_ = problems * blocks;
    parallel_for(problems * blocks, threads, [&](Index task, int slot) {
      const Index problem = task % problems, block = task / problems;
      try {
        run(problem, block, slot, detail::StepOrder(steps_, problem, block));
      } catch (...) {
        steps_.abandon();
        throw;
      }
    });
  }

  // Where the blocks of a problem keep what they share (shared_scalars per problem): blocks that
  // are tasks of their own in a slice of shared_ per problem; a problem that is one task in its
  // thread's workspace, hot in that thread's caches (measured: 5-20 % on LSH at 8 heads).
  struct Shared {
    Index share = 0;
    bool in_thread = false;
    Scalar* take(Workspace& shared, Index problems) const {
      return share > 0 && !in_thread ? shared.take<Scalar>(problems * share) : nullptr;
    }
    Scalar* of(Scalar* shared, Index problem, Workspace& ws) const {
      if (share == 0) return nullptr;
      return in_thread ? ws.take<Scalar>(share) : shared + problem * share;
    }
  };
  Shared share_blocks(Index problems, Index blocks, Index share, std::size_t scratch,
                      bool may_keep_in_thread = true) {
    const Shared sh{share, blocks == 1 && may_keep_in_thread};
    if (sh.in_thread)
      pool_.reserve_each(scratch + Workspace::bytes_for<Scalar>(share));
    else
      shared_.reserve(Workspace::bytes_for<Scalar>(problems * share));
    return sh;
  }

  Index shared_scalars(Index n_q, Index n_k, Index dk, Index dv) const {
    return detail::shared_scalars_of(policy_, n_q, n_k, dk, dv, causal);
  }

  HeadContext context(Index b, Index head, Index q0, const SequenceShape& q_shape,
                      const SequenceShape& kv_shape) const {
    HeadContext ctx{b, head, q0, kv_shape.valid_length(b), kv_shape.seq - q_shape.seq, causal};
    ctx.window = masking_.keys();
    return ctx;
  }

  template <class M>
  static void check_size(const M& m, Index rows, Index cols, const char* name) {
    detail::require(m.rows() == rows && m.cols() == cols, "AttentionCore", name,
                    detail::concat("a ", m.rows(), "×", m.cols(), " matrix"),
                    detail::concat("a ", rows, "×", cols, " matrix"));
  }

  void check(ConstView<S> q, ConstView<S> k, ConstView<S> v, const SequenceShape& q_shape,
             const SequenceShape& kv_shape) const {
    q_shape.validate_rows("AttentionCore", "q_shape", "q", q.rows());
    kv_shape.validate_rows("AttentionCore", "kv_shape", "k", k.rows());
    detail::require(kv_shape.batch == q_shape.batch, "AttentionCore", "kv_shape.batch",
                    kv_shape.batch, detail::concat("the query batch, ", q_shape.batch));
    check_size(q, q.rows(), layout_.heads * layout_.d_key, "q");
    check_size(k, k.rows(), layout_.kv() * layout_.d_key, "k");
    check_size(v, k.rows(), layout_.kv() * layout_.d_value, "v");
  }

  // dk, dv of every key/value head: the sum of its query heads' parts, in head order.
  void sum_group_parts(View<S> dk, View<S> dv, Index batch, Index n_k, int threads) {
    const Index kv = layout_.kv(), group = layout_.group();
    parallel_for(batch * kv, threads, [&](Index task, int) {
      const Index b = task / kv, g = task % kv;
      for (auto [whole, parts, w] : {std::tuple{dk, &dk_parts_, layout_.d_key},
                                     std::tuple{dv, &dv_parts_, layout_.d_value}}) {
        auto to = whole.block(b * n_k, g * w, n_k, w);
        to = parts->block(b * n_k, g * group * w, n_k, w);
        for (Index j = 1; j < group; ++j)
          to += parts->block(b * n_k, (g * group + j) * w, n_k, w);
      }
    });
  }

  static HeadLayout check_layout(HeadLayout layout) {
    constexpr const char* who = "AttentionCore";
    detail::require(layout.heads >= 1, who, "layout.heads", layout.heads, "at least 1");
    detail::require(
        layout.kv_heads >= 0 && layout.kv() <= layout.heads && layout.heads % layout.kv() == 0, who,
        "layout.kv_heads", layout.kv_heads,
        detail::concat("a divisor of heads = ", layout.heads,
                       " (key/value heads shared by groups of query heads), or 0"));
    if constexpr (detail::policy_shares_qk<Policy>)
      detail::require(layout.kv() == layout.heads, who, "layout.kv_heads", layout.kv_heads,
                      detail::concat(layout.heads, " (or 0): ", Policy::name,
                                     " shares QK, so its keys are its queries' heads; grouped "
                                     "key/value heads need a policy with its own keys"));
    return layout;
  }

  HeadLayout layout_;
  Policy policy_;
  Masking masking_;
  Matrix<S> dk_parts_, dv_parts_;  // GQA: each query head's key and value gradients
  std::vector<typename Policy::Saved> saved_;
  WorkspacePool pool_{1};
  detail::OrderedSteps steps_;
  // What a blocked policy's blocks of each problem share: raw memory, so that a policy may keep
  // integers in it beside its scalars (LSHAttention's sorted orders and chunk cuts).
  Workspace shared_;
  Index last_tasks_ = 0;
  Last last_{};
  detail::InstanceId id_;
  detail::ExclusiveUse in_use_;
};

}  // namespace effattn

namespace effattn::detail {
/// The core a multi-head block runs a policy with: AttentionCore<Policy, Masking>, unless the
/// policy brings its own (`template <class M> using core = …;`, as the sequence-parallel
/// policies of effattn/mpi/ do), which must offer AttentionCore's interface.
template <class Policy, class Masking>
struct CoreOf {
  using type = AttentionCore<Policy, Masking>;
};
template <class Policy, class Masking>
requires requires {
  typename Policy::template core<Masking>;
}
struct CoreOf<Policy, Masking> {
  using type = typename Policy::template core<Masking>;
};
}  // namespace effattn::detail

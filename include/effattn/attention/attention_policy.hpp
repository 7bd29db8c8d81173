#pragma once
// The AttentionPolicy concept, built from small named requirements so that a failure
// names the one that is missing.

#include <concepts>
#include <cstddef>
#include <string_view>

#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// `using Scalar = float;` (or double): the precision a policy computes and accumulates in.
template <class P>
concept PolicyHasScalar = requires {
  typename P::Scalar;
}
&&std::floating_point<typename P::Scalar>;

/// Compile-time facts the multi-head block relies on: a short `name`, whether the policy
/// can be causal, whether n_q ≠ n_k is allowed, and whether forward may be run on a slice
/// of a head's queries (so the block can split one head across threads).
template <class P>
concept PolicyStatesCapabilities = requires {
  { P::name } -> std::convertible_to<std::string_view>;
  { P::supports_causal } -> std::convertible_to<bool>;
  { P::supports_cross_attention } -> std::convertible_to<bool>;
  { P::splits_queries } -> std::convertible_to<bool>;
};

/// `Config` (its settings) and construction from a Config and the block's HeadLayout.
template <class P>
concept PolicyIsConstructible = requires {
  typename P::Config;
}
&&std::constructible_from<P, typename P::Config, HeadLayout>;

/// `Saved`: what forward keeps of one (sequence, head) for backward, made by make_saved.
template <class P>
concept PolicyHasSavedState = requires(const P& p, Index n) {
  typename P::Saved;
  { p.make_saved(n, n) } -> std::same_as<typename P::Saved>;
};

/// `scratch_bytes(n_q, n_k, d_k, d_v)`: the most workspace one forward or backward call
/// takes, so the block can size every thread's workspace before the parallel region;
/// `validate(n_q, n_k, d_k, d_v, causal)` throws effattn::Error for an unsupported problem.
template <class P>
concept PolicyPlansAndChecks = requires(const P& p, Index n, bool causal) {
  { p.scratch_bytes(n, n, n, n) } -> std::convertible_to<std::size_t>;
  p.validate(n, n, n, n, causal);
};

/// forward(q, k, v, out, saved*, context, workspace) for one head of one sequence.
template <class P>
concept PolicyHasForward = PolicyHasScalar<P> && PolicyHasSavedState<P> &&
    requires(const P& p, ConstView<typename P::Scalar> in, View<typename P::Scalar> out,
             typename P::Saved* saved, const HeadContext& ctx, Workspace& ws) {
  p.forward(in, in, in, out, saved, ctx, ws);
};

/// backward(q, k, v, out, d_out, saved, d_q, d_k, d_v, context, workspace), overwriting
/// d_q, d_k, d_v (and accumulating the gradients of the policy's own parameters).
template <class P>
concept PolicyHasBackward = PolicyHasScalar<P> && PolicyHasSavedState<P> &&
    requires(const P& p, ConstView<typename P::Scalar> in, View<typename P::Scalar> out,
             const typename P::Saved& saved, const HeadContext& ctx, Workspace& ws) {
  p.backward(in, in, in, in, in, saved, out, out, out, ctx, ws);
};

/// An attention policy computes out[n_q×d_v] = attention(q[n_q×d_k], k[n_k×d_k],
/// v[n_k×d_v]) for one head of one sequence, and its backward.
///
/// Optional: blocks, so that the threads share one head (AttentionCore finds these by name).
/// A call's work for one (sequence, head) is a fixed sequence of blocks of the sequence, each
/// one task, numbered so that a block's step comes after those it needs:
///   forward_blocks(n_q, n_k, d_k, d_v, causal, spread) → Index, and
///   forward_block(block, q, k, v, out, saved*, context, workspace, order, shared) const;
///   backward_blocks(…) and backward_block(block, q, k, v, out, d_out, saved, d_q, d_k, d_v,
///   context, workspace, order, shared) const, likewise;
///   shared_scalars(n_q, n_k, d_k, d_v, causal) → Index: what the blocks of one problem share
///   (sums they merge), given to every block as `shared`;
///   decode_blocks(m, n), decode_append(k, v, state) and decode_block(block, q, out, head,
///   state, workspace, order): decoding in blocks of the cache;
///   query_grain(d_k, d_v) → Index: with splits_queries, the rows a query slice is a multiple
///   of (the policy's query tile), so that a split does not change any row's bits;
///   finish_backward(problems, at, threads, workspace) → Index (tasks): with backward blocks, a
///   stage over every problem of the call together, after all their blocks (LowRank: the
///   projections, whose gradients every problem adds to, summed in a fixed order); at(problem)
///   gives a detail::ProblemGradients, workspace(slot) a thread's Workspace.
/// `order` (detail::StepOrder) runs a block's merge after the merges of the blocks before it
/// (order(f)) and waits for the first n blocks' merges (order.wait(n)); AttentionCore hands the
/// blocks out step-major across problems. Blocks are fixed rows of the sequence, never a share
/// of the threads, and merges run in block order: the bits do not depend on the thread count.
/// forward and backward must equal their blocks run in order (detail::InCallOrder). `spread`
/// (also HeadContext::spread) is the threads the call has per problem: a policy may choose its
/// blocks by it where a split costs extra work, but never so that the bits change.
template <class P>
concept AttentionPolicy = PolicyHasScalar<P> && PolicyStatesCapabilities<P> &&
    PolicyIsConstructible<P> && PolicyHasSavedState<P> && PolicyPlansAndChecks<P> &&
    PolicyHasForward<P> && PolicyHasBackward<P>;

namespace detail {

/// One (sequence, head) of a call as a policy's finish_backward sees it: its keys, values,
/// their gradients, its context and what its backward blocks shared.
template <class S>
struct ProblemGradients {
  ConstView<S> k, v;
  View<S> d_k, d_v;
  HeadContext ctx;
  const S* shared;
};

/// One static_assert per requirement, so the compiler's first message says which is missing.
template <class P>
constexpr bool assert_attention_policy() {
  static_assert(PolicyHasScalar<P>,
                "effattn: this type is not an attention policy: it needs `using Scalar = float;` "
                "(or double). See effattn/attention/attention_policy.hpp.");
  static_assert(PolicyStatesCapabilities<P>,
                "effattn: this type is not an attention policy: it needs static constexpr "
                "`name`, `supports_causal`, `supports_cross_attention` and `splits_queries`.");
  static_assert(PolicyIsConstructible<P>,
                "effattn: this type is not an attention policy: it needs a nested `Config` and a "
                "constructor P(Config, HeadLayout).");
  static_assert(PolicyHasSavedState<P>,
                "effattn: this type is not an attention policy: it needs a nested `Saved` and "
                "`Saved make_saved(Index n_q, Index n_k) const`.");
  static_assert(PolicyPlansAndChecks<P>,
                "effattn: this type is not an attention policy: it needs `scratch_bytes(n_q, n_k, "
                "d_k, d_v) const` and `validate(n_q, n_k, d_k, d_v, causal) const`.");
  static_assert(PolicyHasForward<P>,
                "effattn: this type is not an attention policy: it needs `forward(q, k, v, out, "
                "Saved*, const HeadContext&, Workspace&) const`.");
  static_assert(PolicyHasBackward<P>,
                "effattn: this type is not an attention policy: it needs `backward(q, k, v, out, "
                "d_out, const Saved&, d_q, d_k, d_v, const HeadContext&, Workspace&) const`.");
  return true;
}

/// The scalars a blocked policy's blocks share (0 for a policy that needs none).
template <class P>
Index shared_scalars_of(const P& p, Index n_q, Index n_k, Index d_k, Index d_v, bool causal) {
  if constexpr (requires { p.shared_scalars(n_q, n_k, d_k, d_v, causal); })
    return p.shared_scalars(n_q, n_k, d_k, d_v, causal);
  else
    return 0;
}

/// A blocked policy's forward of one head as one call: its blocks in order on this thread,
/// their shared sums in ws (what forward() of such a policy is).
template <class P, class S = typename P::Scalar>
void forward_in_block_order(const P& p, ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
                            typename P::Saved* saved, const HeadContext& ctx, Workspace& ws) {
  Workspace::Frame frame(ws);
  S* shared = ws.take<S>(shared_scalars_of(p, q.rows(), k.rows(), q.cols(), v.cols(), ctx.causal));
  const Index blocks =
      p.forward_blocks(q.rows(), k.rows(), q.cols(), v.cols(), ctx.causal, ctx.spread);
  for (Index b = 0; b < blocks; ++b)
    p.forward_block(b, q, k, v, out, saved, ctx, ws, InCallOrder{}, shared);
}

/// Likewise backward (what backward() of a policy whose backward runs in blocks is).
template <class P, class S = typename P::Scalar>
void backward_in_block_order(const P& p, ConstView<S> q, ConstView<S> k, ConstView<S> v,
                             ConstView<S> out, ConstView<S> d_out, const typename P::Saved& saved,
                             View<S> d_q, View<S> d_k, View<S> d_v, const HeadContext& ctx,
                             Workspace& ws) {
  Workspace::Frame frame(ws);
  S* shared = ws.take<S>(shared_scalars_of(p, q.rows(), k.rows(), q.cols(), v.cols(), ctx.causal));
  const Index blocks =
      p.backward_blocks(q.rows(), k.rows(), q.cols(), v.cols(), ctx.causal, ctx.spread);
  for (Index b = 0; b < blocks; ++b)
    p.backward_block(b, q, k, v, out, d_out, saved, d_q, d_k, d_v, ctx, ws, InCallOrder{}, shared);
}

/// Whether a policy computes its keys from the queries (`static constexpr bool shared_qk`),
/// as Reformer's LSH attention does; the multi-head block then has no key projection.
template <class P>
constexpr bool policy_shares_qk = [] {
  if constexpr (requires { P::shared_qk; })
    return bool(P::shared_qk);
  else
    return false;
}();

/// Whether a policy attends within a window (`static constexpr bool supports_window`): it reads
/// HeadContext::key_begin and skips the keys before it.
template <class P>
constexpr bool policy_supports_window = [] {
  if constexpr (requires { P::supports_window; })
    return bool(P::supports_window);
  else
    return false;
}();

/// Whether a policy may run under this masking (attention/masking.hpp), checked in this one
/// place. A policy header may specialise it to reject causal use in its own words (see
/// attention/low_rank.hpp).
template <class Policy, class Masking>
struct MaskingCheck {
  static_assert(!Masking::causal || Policy::supports_causal,
                "effattn: this attention policy cannot be causal (it mixes information from all "
                "positions); use effattn::Bidirectional, or a policy with supports_causal.");
  static_assert(Masking::window == 0 || policy_supports_window<Policy>,
                "effattn: this attention policy cannot attend within a window (CausalWindow<W>, "
                "SlidingWindow<W>): FullAttention is the policy for local heads; use "
                "effattn::Bidirectional or effattn::Causal with this one.");
};

}  // namespace detail
}  // namespace effattn

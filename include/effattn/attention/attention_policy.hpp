#pragma once
// The AttentionPolicy concept, built from small named requirements so that a failure
// names the one that is missing.

#include <concepts>
#include <cstddef>
#include <string_view>
#include <utility>

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
/// v[n_k×d_v]) for one head of one sequence, and its backward: the required parts above.
/// examples/custom_policy.cpp writes one (dilated local attention) outside the library.
template <class P>
concept AttentionPolicy = PolicyHasScalar<P> && PolicyStatesCapabilities<P> &&
    PolicyIsConstructible<P> && PolicyHasSavedState<P> && PolicyPlansAndChecks<P> &&
    PolicyHasForward<P> && PolicyHasBackward<P>;

// ---------------------------------------------------------------------------------------------
// Optional parts. AttentionCore uses each where a policy has it; a policy that has half of one
// (the member that marks it, but not the rest in the shape below) does not compile, and
// detail::assert_optional_parts says which part and what it needs.
//
// Blocks, so that the threads share one head. A call's work for one (sequence, head) is a fixed
// sequence of blocks of the sequence, each one task, numbered so that a block's step comes after
// those it needs. `order` (detail::StepOrder, or detail::InCallOrder when the blocks run in
// order on one thread) runs a block's merge after the merges of the blocks before it
// (order(f)) and waits for the first n blocks' merges (order.wait(n)); AttentionCore hands the
// blocks out step-major across problems. Blocks are fixed rows of the sequence, never a share
// of the threads, and merges run in block order: the bits do not depend on the thread count.
// forward and backward must equal their blocks run in order (detail::forward_in_block_order).
// `spread` (also HeadContext::spread) is the threads the call has per problem: a policy may
// choose its blocks by it where a split costs extra work, but never so that the bits change.
// `shared_scalars(n_q, n_k, d_k, d_v, causal) → Index` (optional within the part) is what the
// blocks of one problem share (sums they merge), given to every block as `shared`.
// ---------------------------------------------------------------------------------------------

/// Forward in blocks (Favor, LowRank, LSH): `forward_blocks(n_q, n_k, d_k, d_v, causal, spread)
/// → Index` and `forward_block(block, q, k, v, out, Saved*, ctx, ws, order, shared)`.
template <class P>
concept PolicyForwardsInBlocks = PolicyHasForward<P> &&
    requires(const P& p, ConstView<typename P::Scalar> in, View<typename P::Scalar> out,
             typename P::Saved* saved, const HeadContext& ctx, Workspace& ws,
             const detail::StepOrder& order, typename P::Scalar* shared) {
  {
    p.forward_blocks(Index{}, Index{}, Index{}, Index{}, true, Index{})
    } -> std::convertible_to<Index>;
  p.forward_block(Index{}, in, in, in, out, saved, ctx, ws, order, shared);
  p.forward_block(Index{}, in, in, in, out, saved, ctx, ws, detail::InCallOrder{}, shared);
};

/// Backward in blocks (Full: key blocks; Favor, LowRank, LSH): `backward_blocks(…) → Index` and
/// `backward_block(block, q, k, v, out, d_out, saved, d_q, d_k, d_v, ctx, ws, order, shared)`.
template <class P>
concept PolicyBackwardsInBlocks = PolicyHasBackward<P> &&
    requires(const P& p, ConstView<typename P::Scalar> in, View<typename P::Scalar> out,
             const typename P::Saved& saved, const HeadContext& ctx, Workspace& ws,
             const detail::StepOrder& order, typename P::Scalar* shared) {
  {
    p.backward_blocks(Index{}, Index{}, Index{}, Index{}, true, Index{})
    } -> std::convertible_to<Index>;
  p.backward_block(Index{}, in, in, in, in, in, saved, out, out, out, ctx, ws, order, shared);
  p.backward_block(Index{}, in, in, in, in, in, saved, out, out, out, ctx, ws,
                   detail::InCallOrder{}, shared);
};

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
}  // namespace detail

/// With backward blocks, a stage over every problem of the call together, after all their
/// blocks (LowRank: the projections, whose gradients every problem adds to, summed in a fixed
/// order): `finish_backward(problems, at, threads, workspace) → Index` (its tasks); at(problem)
/// gives a detail::ProblemGradients, workspace(slot) a thread's Workspace.
template <class P>
concept PolicyFinishesBackward = PolicyBackwardsInBlocks<P> &&
    requires(const P& p, detail::ProblemGradients<typename P::Scalar> (*at)(Index),
             Workspace& (*workspace)(int)) {
  { p.finish_backward(Index{}, at, 1, workspace) } -> std::convertible_to<Index>;
};

/// Incremental decoding (Full: a key/value cache; Favor: its recurrent state): a `DecodeState`
/// per (sequence, head) with `bytes()`, made by `decode_state(head, d_k, d_v)`;
/// `decode_scratch_bytes(m, n, d_k, d_v)` for m new tokens after n; and
/// `decode(q, k, v, out, head, state, ws)`, which appends the m tokens and attends from them.
template <class P>
concept PolicyDecodes = requires(const P& p, ConstView<typename P::Scalar> in,
                                 View<typename P::Scalar> out, typename P::DecodeState& st,
                                 Workspace& ws) {
  { p.decode_state(Index{}, Index{}, Index{}) } -> std::same_as<typename P::DecodeState>;
  {
    p.decode_scratch_bytes(Index{}, Index{}, Index{}, Index{})
    } -> std::convertible_to<std::size_t>;
  p.decode(in, in, in, out, Index{}, st, ws);
  { std::as_const(st).bytes() } -> std::convertible_to<std::size_t>;
};

/// Decoding in blocks of a long cache (Full: flash decoding): `decode_blocks(m, n) → Index`,
/// `decode_append(k, v, state)` (first, once), then `decode_block(block, q, out, head, state,
/// ws, order)` for every block, merged in block order.
template <class P>
concept PolicyDecodesInBlocks = PolicyDecodes<P> &&
    requires(const P& p, ConstView<typename P::Scalar> in, View<typename P::Scalar> out,
             typename P::DecodeState& st, Workspace& ws, const detail::StepOrder& order) {
  { p.decode_blocks(Index{}, Index{}) } -> std::convertible_to<Index>;
  p.decode_append(in, in, st);
  p.decode_block(Index{}, in, out, Index{}, st, ws, order);
};

/// With splits_queries: `query_grain(d_k, d_v) → Index`, the rows a query slice is a multiple of
/// (the policy's query tile), so that a split does not change any row's bits.
template <class P>
concept PolicyHasQueryGrain = requires(const P& p) {
  { p.query_grain(Index{}, Index{}) } -> std::convertible_to<Index>;
};

/// Saved state sized for its head: `make_saved(n_q, n_k, head)` (LocalHeads: only the state of
/// the head's own policy); AttentionCore uses it where a policy has it.
template <class P>
concept PolicySavesPerHead = PolicyHasSavedState<P> && requires(const P& p) {
  { p.make_saved(Index{}, Index{}, Index{}) } -> std::same_as<typename P::Saved>;
};

/// Windows: `static constexpr bool supports_window = true` says the policy reads
/// HeadContext::key_begin (detail::policy_supports_window); `use_window(KeyWindow)`, called
/// once at construction with the masking's window, lets it fit its tiles to it (Full).
template <class P>
concept PolicyUsesWindow = requires(P& p) {
  p.use_window(KeyWindow{});
};

// Elsewhere, by the same rule: `static constexpr bool shared_qk` (keys are the queries: no key
// projection, detail::policy_shares_qk); `visit_parameters(f)` and `zero_grad()` for a policy
// with parameters of its own (LowRank's E and F: the block visits them as its own);
// random_state() / set_random_state() (attention/random_state.hpp) for a policy with random
// draws that checkpoints keep; `template <class M> using core = …` for a policy that brings its
// own core (effattn/mpi/).

namespace detail {

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

/// One static_assert per optional part a policy has begun (its marking member is there) but not
/// finished: the message names the part and what it needs.
template <class P>
constexpr bool assert_optional_parts() {
  static_assert(
      !requires { &P::forward_blocks; } || PolicyForwardsInBlocks<P>,
      "effattn: this policy has forward_blocks, so it runs its forward in blocks "
      "(PolicyForwardsInBlocks): it needs `Index forward_blocks(n_q, n_k, d_k, d_v, "
      "causal, spread) const` and `template <class Order> void forward_block(block, q, "
      "k, v, out, Saved*, const HeadContext&, Workspace&, const Order&, Scalar* shared) "
      "const`.");
  static_assert(
      !requires { &P::backward_blocks; } || PolicyBackwardsInBlocks<P>,
      "effattn: this policy has backward_blocks, so it runs its backward in blocks "
      "(PolicyBackwardsInBlocks): it needs `Index backward_blocks(n_q, n_k, d_k, d_v, "
      "causal, spread) const` and `template <class Order> void backward_block(block, q, "
      "k, v, out, d_out, const Saved&, d_q, d_k, d_v, const HeadContext&, Workspace&, "
      "const Order&, Scalar* shared) const`.");
  static_assert(
      !requires { typename P::DecodeState; } || PolicyDecodes<P>,
      "effattn: this policy has a DecodeState, so it decodes (PolicyDecodes): it needs "
      "`DecodeState decode_state(head, d_k, d_v) const`, `std::size_t "
      "decode_scratch_bytes(m, n, d_k, d_v) const`, `void decode(q, k, v, out, head, "
      "DecodeState&, Workspace&) const` and `std::size_t DecodeState::bytes() const`.");
  static_assert(
      !requires { &P::decode_blocks; } || PolicyDecodesInBlocks<P>,
      "effattn: this policy has decode_blocks, so it decodes in blocks of its cache "
      "(PolicyDecodesInBlocks): it needs PolicyDecodes, `Index decode_blocks(m, n) "
      "const`, `void decode_append(k, v, DecodeState&) const` and `template <class "
      "Order> void decode_block(block, q, out, head, DecodeState&, Workspace&, const "
      "Order&) const`.");
  static_assert(
      !requires { &P::query_grain; } || PolicyHasQueryGrain<P>,
      "effattn: this policy's query_grain must be `Index query_grain(d_k, d_v) const`.");
  static_assert(
      !requires { &P::use_window; } || PolicyUsesWindow<P>,
      "effattn: this policy's use_window must be `void use_window(KeyWindow)`.");
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
  static_assert(!Masking::windowed || policy_supports_window<Policy>,
                "effattn: this attention policy cannot attend within a window (CausalWindow<W>, "
                "SlidingWindow<W>): FullAttention is the policy for local heads; use "
                "effattn::Bidirectional or effattn::Causal with this one.");
};

}  // namespace detail
}  // namespace effattn

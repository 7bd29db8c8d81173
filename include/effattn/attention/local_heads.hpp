#pragma once
// LocalHeads<Global>: some heads of a block attend exactly within a window, the others with a
// global policy (performer-pytorch's local_attn_heads, reformer-pytorch's n_local_attn_heads).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "effattn/attention/attention_policy.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/attention/random_state.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// Mixed heads in one block: heads [0, local_heads) run exact attention (FullAttention) in a
/// window of `window` keys, the others `Global` (Favor, LSHAttention, FullAttention, LowRank), as
/// performer-pytorch's `local_attn_heads` and reformer-pytorch's `n_local_attn_heads` do. The
/// block's masking says which window: Causal gives the local heads CausalWindow's (the `window`
/// keys up to the row), Bidirectional SlidingWindow's (around it). One config:
///
///   MultiHeadAttention<LocalHeads<Favor<float>>, Causal> block(
///       {.d_model = 512, .heads = 8, .policy = {.local_heads = 2, .window = 256}});
///
/// Global head h of the block is head h − local_heads of its own policy (its random features,
/// ALiBi slopes or projections are numbered so); a checkpoint keeps the global policy's random
/// state under the block's path. With a shared-QK global policy (LSHAttention) the block is
/// shared-QK, and the local heads attend exactly on the shared query-keys. Each (sequence, head)
/// is one task: a head's blocks (issue: intra-head parallelism) are not offered, and the block
/// does not decode incrementally.
template <class Global>
class LocalHeads {
  static_assert(detail::assert_attention_policy<Global>());

 public:
  using Scalar = typename Global::Scalar;
  using S = Scalar;
  using Local = FullAttention<S>;
  static constexpr const char* name = "local_heads";
  static constexpr bool supports_causal = Global::supports_causal;
  static constexpr bool supports_cross_attention = Global::supports_cross_attention;
  static constexpr bool splits_queries = false;
  static constexpr bool shared_qk = detail::policy_shares_qk<Global>;

  struct Config {
    Index local_heads = 0;  ///< heads [0, local_heads) are local
    Index window = 256;     ///< keys a local head's row sees, itself included
    typename Local::Config local{};
    typename Global::Config global{};
  };
  /// What forward keeps of one (sequence, head): the local or the global policy's.
  struct Saved {
    typename Local::Saved local{};
    typename Global::Saved global{};
    std::size_t bytes() const { return local.bytes() + global.bytes(); }
  };

  LocalHeads(Config config, HeadLayout layout)
      : config_(checked(config, layout)),
        local_(config.local, part(layout, 0, config.local_heads)),
        global_(config.global, part(layout, config.local_heads, layout.heads)),
        heads_(layout.heads) {}

  const Local& local() const { return local_; }
  const Global& global() const { return global_; }
  Global& global() { return global_; }
  const Config& config() const { return config_; }

  /// The block's masking (through AttentionCore): the local heads' window is causal with it.
  void use_window(KeyWindow masking) { local_.use_window(window(masking.after == 0)); }

  Saved make_saved(Index n_q, Index n_k) const {
    return {local_.make_saved(n_q, n_k), global_.make_saved(n_q, n_k)};
  }
  /// Only the state of the head's own policy (PolicySavesPerHead).
  Saved make_saved(Index n_q, Index n_k, Index head) const {
    Saved s;
    if (is_local(head))
      s.local = local_.make_saved(n_q, n_k);
    else
      s.global = global_.make_saved(n_q, n_k);
    return s;
  }
  std::size_t scratch_bytes(Index n_q, Index n_k, Index d_k, Index d_v) const {
    return std::max(local_.scratch_bytes(n_q, n_k, d_k, d_v),
                    global_.scratch_bytes(n_q, n_k, d_k, d_v));
  }
  void validate(Index n_q, Index n_k, Index d_k, Index d_v, bool causal) const {
    if (config_.local_heads > 0) local_.validate(n_q, n_k, d_k, d_v, causal);
    if (config_.local_heads < heads_) global_.validate(n_q, n_k, d_k, d_v, causal);
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Saved* saved,
               const HeadContext& ctx, Workspace& ws) const {
    if (is_local(ctx.head))
      local_.forward(q, k, v, out, saved ? &saved->local : nullptr, local_context(ctx), ws);
    else
      global_.forward(q, k, v, out, saved ? &saved->global : nullptr, global_context(ctx), ws);
  }
  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    if (is_local(ctx.head))
      local_.backward(q, k, v, out, d_out, saved.local, d_q, d_k, d_v, local_context(ctx), ws);
    else
      global_.backward(q, k, v, out, d_out, saved.global, d_q, d_k, d_v, global_context(ctx), ws);
  }

  // The global policy's parameters (LowRank's E, F) and random state (Favor's features, LSH's
  // rotations) are the block's: the same names, under the same path.
  template <class F>
  void visit_parameters(F&& f) requires requires(Global& g) {
    g.visit_parameters(f);
  }
  { global_.visit_parameters(f); }
  void zero_grad() requires requires(Global& g) { g.zero_grad(); }
  { global_.zero_grad(); }
  auto random_state() const requires detail::HasRandomState<Global> {
    return global_.random_state();
  }
  std::string check_random_state(
      const RandomState<S>& state) const requires detail::HasRandomState<Global> {
    return global_.check_random_state(state);
  }
  void set_random_state(const RandomState<S>& state) requires detail::HasRandomState<Global> {
    global_.set_random_state(state);
  }
  bool claims_random_tensor(
      const std::string& tensor) const requires detail::HasRandomState<Global> {
    return global_.claims_random_tensor(tensor);
  }
  void redraw(std::uint64_t seed) requires detail::HasRandomState<Global> { global_.redraw(seed); }

 private:
  static Config checked(const Config& c, const HeadLayout& layout) {
    constexpr const char* who = "LocalHeads";
    detail::require(c.local_heads >= 0 && c.local_heads <= layout.heads, who, "local_heads",
                    c.local_heads,
                    detail::concat("0 … heads = ", layout.heads, " (the heads that are local)"));
    detail::require(c.window >= 1, who, "window", c.window, "at least 1 key (the row itself)");
    return c;
  }
  // The layout of heads [from, to) as their own policy sees it (heads counted from 0).
  static HeadLayout part(HeadLayout layout, Index from, Index to) {
    layout.heads = std::max<Index>(1, to - from);
    layout.kv_heads = 0;
    return layout;
  }
  bool is_local(Index head) const { return head < config_.local_heads; }
  KeyWindow window(bool causal) const { return KeyWindow::of_size(config_.window, causal); }
  HeadContext local_context(HeadContext ctx) const {
    ctx.window = window(ctx.causal);
    return ctx;
  }
  HeadContext global_context(HeadContext ctx) const {
    ctx.head -= config_.local_heads;
    return ctx;
  }

  Config config_;
  Local local_;
  Global global_;
  Index heads_ = 0;
};

}  // namespace effattn

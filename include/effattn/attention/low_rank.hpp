#pragma once
// LowRank: Linformer's attention with keys and values projected along the sequence.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "effattn/attention/attention_policy.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/attention/projections/conv_projection.hpp"
#include "effattn/attention/projections/dense_projection.hpp"
#include "effattn/attention/projections/max_pooling.hpp"
#include "effattn/attention/projections/mean_pooling.hpp"
#include "effattn/attention/projections/sequence_projection.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// Which heads, keys and values share a projection (Linformer §4, "parameter sharing").
enum class ProjectionSharing {
  none,       ///< every head has its own E_h (keys) and F_h (values)
  headwise,   ///< one E and one F per layer, shared by its heads
  key_value,  ///< one E per layer for keys and values of every head (F = E)
  layerwise,  ///< one E for keys and values of every head of several layers (Config::shared)
};

/// Linformer (Wang et al. 2020, docs/algorithms.md §3): per head,
///   out = softmax(s · q (E k)ᵀ) (F v),   E k, F v ∈ ℝ^{r × d},  s = 1/√d_k by default,
/// where E, F are a Projection along the sequence (DenseProjection: learned k × n_max;
/// MeanPooling / MaxPooling / ConvProjection: windows of `kernel` tokens, r = n/kernel).
/// The attention over the r projected rows is FullAttention's kernel, so time is
/// O(n·r·d) and scratch O(r·d + tile·r) per thread. Forward keeps E k, F v and each row's
/// log-sum-exp for backward, which gives dq, dk, dv and adds the projections' gradients.
///
/// Not causal: every projected row mixes all positions, so `MultiHeadAttention<LowRank<…>,
/// Causal>` does not compile. Cross-attention (n_q ≠ n_k) is fine: E projects the keys.
///
/// Key padding: padded key and value rows are treated as zeros before projecting. For a
/// dense E that is exactly the unpadded sequence of the valid length (its first L columns);
/// the r projected keys are then all kept, so the softmax still normalises over r rows (the
/// projection, not the padding, decides their weights). Pooled or convolved windows made
/// only of padding are masked out of the softmax; a window that is partly padding
/// averages (mean) or convolves its padding as zeros, and max pooling leaves it out.
///
/// Sharing (ProjectionSharing): layerwise sharing uses shared ownership. A layer whose
/// Config::shared is empty makes the projection, owns its visiting (visit_parameters,
/// zero_grad) and hands it out by shared_projection(); pass that to the other layers'
/// Config::shared and they use it (adding their gradients to it) without visiting it, so an
/// optimiser updates it once. Copying a LowRank copies its own projections and keeps
/// sharing a layerwise one (the copy does not visit it). The projections' gradients are
/// summed over the heads and sequences of a call in a fixed order (backward_projections), so
/// every thread count gives the same bits.
template <class S = float, template <class> class Projection = DenseProjection>
class LowRank {
 public:
  using Scalar = S;
  using Proj = Projection<S>;
  static_assert(SequenceProjection<Proj>,
                "effattn: LowRank<S, P> needs a projection along the sequence: P<S> must satisfy "
                "SequenceProjection (see effattn/attention/projections/sequence_projection.hpp).");
  static constexpr const char* name = "lowrank";
  static constexpr bool supports_causal = false;  // see detail::MaskingCheck below
  static constexpr bool supports_cross_attention = true;
  static constexpr bool splits_queries = false;  // a slice would project the keys again

  struct Config {
    typename Proj::Config projection{};  ///< k and n_max (dense), or the kernel
    ProjectionSharing sharing = ProjectionSharing::headwise;
    std::shared_ptr<Proj> shared{};  ///< layerwise: another layer's shared_projection()
    std::optional<double> scale{};   ///< logit scale; default 1/√d_k
  };

  /// E k, F v of one (sequence, head) and the attention's row log-sum-exp.
  struct Saved {
    Matrix<S> keys, values;
    typename FullAttention<S>::Saved attention;
    std::size_t bytes() const {
      return sizeof(S) * static_cast<std::size_t>(keys.size() + values.size()) + attention.bytes();
    }
  };

  LowRank() : LowRank(Config{}, HeadLayout{}) {}
  LowRank(Config config, HeadLayout layout)
      : config_(std::move(config)), layout_(layout), attention_({0, 0, config_.scale}, layout) {
    constexpr const char* who = "LowRank";
    detail::require(
        layout_.heads > 0 && layout_.d_key > 0 && layout_.d_value > 0, who, "layout",
        detail::concat(layout_.heads, " heads of widths ", layout_.d_key, ", ", layout_.d_value),
        "at least one head of widths at least 1");
    const bool layerwise = config_.sharing == ProjectionSharing::layerwise;
    detail::require(!config_.shared || layerwise, who, "shared", "a projection",
                    "none unless sharing is ProjectionSharing::layerwise");
    if (config_.shared) {
      if constexpr (requires { config_.projection.k; })
        detail::require(config_.shared->config().k == config_.projection.k &&
                            config_.shared->config().n_max == config_.projection.n_max,
                        who, "shared",
                        detail::concat("a projection of k = ", config_.shared->config().k,
                                       ", n_max = ", config_.shared->config().n_max),
                        detail::concat("this layer's k = ", config_.projection.k,
                                       ", n_max = ", config_.projection.n_max,
                                       " (layerwise sharing needs one shape)"));
      else
        detail::require(config_.shared->config().kernel == config_.projection.kernel, who, "shared",
                        detail::concat("a projection of kernel ", config_.shared->config().kernel),
                        detail::concat("this layer's kernel, ", config_.projection.kernel));
      slots_.push_back(config_.shared);
      owns_shared_ = false;
      config_.shared.reset();  // the slot holds it; the config keeps no second owner
      return;
    }
    const Index count = slot_count();
    for (Index s = 0; s < count; ++s)
      slots_.push_back(std::make_shared<Proj>(
          config_.projection, CounterRng(layout_.seed, 0x4c494e46ull + std::uint64_t(s))));
  }

  LowRank(const LowRank& other)
      : config_(other.config_),
        layout_(other.layout_),
        attention_(other.attention_),
        owns_shared_(config_.sharing != ProjectionSharing::layerwise) {
    const bool layerwise = config_.sharing == ProjectionSharing::layerwise;
    for (const auto& s : other.slots_)
      slots_.push_back(layerwise ? s : std::make_shared<Proj>(*s));
  }
  LowRank& operator=(const LowRank& other) {
    if (this != &other) *this = LowRank(other);
    return *this;
  }
  LowRank(LowRank&&) noexcept = default;
  LowRank& operator=(LowRank&&) noexcept = default;
  ~LowRank() = default;

  const Config& config() const { return config_; }

  /// The projection applied to the keys (values = false) or values of `head`.
  Proj& projection(Index head, bool values = false) { return *slots_[slot(head, values)]; }
  const Proj& projection(Index head, bool values = false) const {
    return *slots_[slot(head, values)];
  }
  /// With layerwise sharing: the projection to hand to the other layers' Config::shared.
  std::shared_ptr<Proj> shared_projection() const {
    return config_.sharing == ProjectionSharing::layerwise ? slots_.front() : nullptr;
  }

  /// Calls f(name, value, gradient) for each projection this layer owns: "E" and "F"
  /// (headwise), "E" (key_value; layerwise, in the layer that made it), "E.<h>", "F.<h>"
  /// (none: head h's). Nothing for projections without parameters.
  template <class F>
  void visit_parameters(F&& f) {
    if constexpr (Proj::learned) {
      if (!owns_shared_) return;
      for (std::size_t s = 0; s < slots_.size(); ++s)
        slots_[s]->visit_parameters(f, slot_name(s));
    }
  }
  void zero_grad() {
    if constexpr (Proj::learned) {
      if (!owns_shared_) return;
      for (auto& s : slots_)
        s->zero_grad();
    }
  }

  Saved make_saved(Index n_q, Index n_k) const {
    const Index r = slots_.front()->rows(n_k);
    return Saved{Matrix<S>(r, layout_.d_key), Matrix<S>(r, layout_.d_value),
                 attention_.make_saved(n_q, r)};
  }

  void validate(Index n_q, Index n_k, Index d_k, Index d_v, bool causal) const {
    constexpr const char* who = "LowRank";
    detail::require(!causal, who, "causal", "true",
                    "false: Linformer's projections mix all positions of the sequence");
    detail::require(n_q > 0, who, "n_q", n_q, "at least 1 query");
    detail::require(n_k > 0, who, "n_k", n_k, "at least 1 key");
    detail::require(d_k == layout_.d_key, who, "d_k", d_k,
                    detail::concat("the layout's key width, ", layout_.d_key));
    detail::require(d_v == layout_.d_value, who, "d_v", d_v,
                    detail::concat("the layout's value width, ", layout_.d_value));
    slots_.front()->check(who, n_k);
  }

  std::size_t scratch_bytes(Index n_q, Index n_k, Index d_k, Index d_v) const {
    using W = Workspace;
    const Index r = slots_.front()->rows(n_k);
    const std::size_t projected = W::bytes_for<S>(r * d_k) + W::bytes_for<S>(r * d_v);
    const std::size_t projection =
        std::max(slots_.front()->scratch_bytes(n_k, d_k), slots_.front()->scratch_bytes(n_k, d_v));
    // Backward called directly keeps the gradients of E k and F v (as `projected`) while a
    // query block takes its own part of them and the attention's scratch.
    return 2 * projected + std::max(attention_.scratch_bytes(n_q, r, d_k, d_v), projection);
  }

  /// Forward runs in blocks: the projected keys, then the projected values, in blocks of
  /// projected_block_rows rows (a projection without forward_rows, such as pooling, in one
  /// block each); then the queries, in blocks of whole query tiles of the attention over the
  /// projected rows. No block merges with another, so the bits do not depend on the threads.
  /// Backward runs the same query blocks: each adds its part of the gradients of E k and F v in
  /// block order; then finish_backward runs the projections' part of every (sequence, head) of
  /// the call together (backward_projections), so that the projections' gradients, which all
  /// of them add to, are summed in a fixed order: the same bits at every thread count.
  static constexpr Index projected_block_rows = 128;
  Index forward_blocks(Index n_q, Index n_k, Index d_k, Index d_v, bool, Index) const {
    return 2 * projection_blocks(n_k) + query_blocks(n_q, d_k, d_v);
  }
  /// Backward's query blocks are tasks of their own only with threads to spare (spread ≥ 2);
  /// otherwise one task runs them in order, with its keys hot in its caches (the same bits:
  /// interleaving 8 heads' blocks on one thread cost 7-15 % with pooled projections).
  Index backward_blocks(Index n_q, Index, Index d_k, Index d_v, bool, Index spread) const {
    return spread >= 2 ? query_blocks(n_q, d_k, d_v) : 1;
  }
  /// Forward: E k and F v when the call keeps no Saved; backward: their gradients.
  Index shared_scalars(Index, Index n_k, Index d_k, Index d_v, bool) const {
    return slots_.front()->rows(n_k) * (d_k + d_v);
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Saved* saved,
               const HeadContext& ctx, Workspace& ws) const {
    detail::forward_in_block_order(*this, q, k, v, out, saved, ctx, ws);
  }

  template <class Order>
  void forward_block(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
                     Saved* saved, const HeadContext& ctx, Workspace& ws, const Order& order,
                     S* shared) const {
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index n_k = k.rows(), r = slots_.front()->rows(n_k), d_k = k.cols(), d_v = v.cols();
    Eigen::Map<Matrix<S>> kp_shared(shared, saved ? 0 : r, d_k);
    Eigen::Map<Matrix<S>> vp_shared(shared + r * d_k, saved ? 0 : r, d_v);
    View<S> kp = saved ? View<S>(saved->keys) : View<S>(kp_shared);
    View<S> vp = saved ? View<S>(saved->values) : View<S>(vp_shared);
    const Index per = projection_blocks(n_k);
    if (block < 2 * per) {  // a block of E k (the first `per`) or of F v
      const bool values = block >= per;
      const Proj& p = projection(ctx.head, values);
      ConstView<S> x = values ? v : k;
      View<S> y = values ? vp : kp;
      if constexpr (requires { p.forward_rows(x, Index{}, y, Index{}, ws); }) {
        const Index row = (block % per) * projected_block_rows;
        const Index rows = std::min(projected_block_rows, r - row);
        p.forward_rows(x, ctx.key_length, y.middleRows(row, rows), row, ws);
      } else {
        p.forward(x, ctx.key_length, y, ws);
      }
      order([] {});
      return;
    }
    order.wait(2 * per);
    const Index tile = query_block_rows(d_k, d_v), i0 = (block - 2 * per) * tile;
    const Index rows = std::min(tile, q.rows() - i0);
    HeadContext projected = projected_context(ctx, n_k);
    projected.query_offset = ctx.query_offset + i0;
    attention_.forward(q.middleRows(i0, rows), kp, vp, out.middleRows(i0, rows),
                       saved ? &saved->attention : nullptr, projected, ws);
  }

  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    Workspace::Frame frame(ws);
    S* shared = ws.take<S>(shared_scalars(q.rows(), k.rows(), q.cols(), v.cols(), false));
    const Index blocks = query_blocks(q.rows(), q.cols(), v.cols());
    for (Index b = 0; b < blocks; ++b)
      query_block_backward(b, q, k.rows(), out, d_out, saved, d_q, ctx, ws, detail::InCallOrder{},
                           shared);
    backward_projections(
        1, [&](Index) { return part_of(k, v, d_k, d_v, ctx, shared); }, 1,
        [&](int) -> Workspace& { return ws; });
  }

  /// Block `block` of backward_blocks(): its query rows' part of the attention's backward over
  /// the projected rows (their rows of d_q), whose gradients of E k and F v it adds to `shared`
  /// inside order(step), in block order (the first block sets them). With spread < 2, the one
  /// block runs every query block in order.
  template <class Order>
  void backward_block(Index block, ConstView<S> q, ConstView<S> k, ConstView<S>, ConstView<S> out,
                      ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S>, View<S>,
                      const HeadContext& ctx, Workspace& ws, const Order& order, S* shared) const {
    const auto part = [&](Index b, const auto& step) {
      query_block_backward(b, q, k.rows(), out, d_out, saved, d_q, ctx, ws, step, shared);
    };
    if (ctx.spread >= 2) {
      part(block, order);
      return;
    }
    const Index blocks = query_blocks(q.rows(), saved.keys.cols(), saved.values.cols());
    for (Index b = 0; b < blocks; ++b)
      part(b, detail::InCallOrder{});
  }

  /// After every (sequence, head)'s backward blocks (AttentionCore calls it): the projections'
  /// part of all of them, at(problem) giving a problem's keys, values, their gradients, its
  /// context and its blocks' shared memory. Returns its tasks.
  template <class At, class WorkspaceOf>
  Index finish_backward(Index problems, At&& at, int threads, WorkspaceOf&& ws) const {
    return backward_projections(
        problems,
        [&](Index problem) {
          const auto p = at(problem);
          return part_of(p.k, p.v, p.d_k, p.d_v, p.ctx, p.shared);
        },
        threads, ws);
  }

  /// One part of the projections' backward: rows of one head's keys and values (k, v) and their
  /// gradients, of which the first `valid` are tokens (the rest padding), at positions
  /// [first, first + k.rows()) of the sequence (first > 0: a shard of it), and the gradients
  /// of that head's projected keys and values.
  struct ProjectionPart {
    Index head;
    ConstView<S> k, v;
    View<S> d_k, d_v;
    Index valid, first;
    ConstView<S> d_kp, d_vp;
  };

  /// The projections' backward of `parts` parts (part(i) → ProjectionPart), as tasks on
  /// `threads` threads (workspace(slot) → the slot's Workspace): every part's d_k and d_v,
  /// and the projections' gradients. A projection with backward_rows (DenseProjection) runs in
  /// blocks of projection_block tokens: a task per block of a projection's gradient columns,
  /// which adds the parts that use the projection in part order (keys before values), and a
  /// task per block of each part's d_k or d_v rows. Every sum then has one order, so the bits
  /// do not depend on the threads. Other learned projections run a task per projection over
  /// its parts in order, and projections without parameters a task per part's keys or values.
  /// Returns the tasks it ran.
  template <class Part, class WorkspaceOf>
  Index backward_projections(Index parts, Part&& part, int threads, WorkspaceOf&& workspace) const {
    if (parts <= 0) return 0;
    constexpr bool in_blocks = requires(Proj & p, ConstView<S> x, View<S> y, Workspace & ws) {
      p.backward_rows(x, y, Index{}, ws);
      p.add_gradient_columns(x, x, Index{}, ws);
      p.prepare_gradient();
    };
    const Index projections = static_cast<Index>(slots_.size());
    if constexpr (in_blocks) {
      Index end = 0;  // the positions every part covers lie before it
      for (Index i = 0; i < parts; ++i) {
        const ProjectionPart p = part(i);
        end = std::max(end, p.first + p.k.rows());
      }
      const Index blocks = (end + projection_block - 1) / projection_block;
      if constexpr (Proj::learned)
        for (auto& s : slots_)
          s->prepare_gradient();
      const Index gradient_tasks = Proj::learned ? projections * blocks : 0;
      const Index tasks = gradient_tasks + 2 * parts * blocks;
      parallel_for(tasks, threads, [&](Index task, int slot) {
        Workspace& ws = workspace(slot);
        if (task < gradient_tasks) {  // columns [c0, c0 + projection_block) of one projection
          const Index s = task / blocks, c0 = (task % blocks) * projection_block;
          for (Index i = 0; i < parts; ++i) {
            const ProjectionPart p = part(i);
            const Index lo = std::max(c0, p.first);
            const Index hi = std::min(c0 + projection_block, p.first + p.valid);
            if (lo >= hi) continue;
            for (const bool values : {false, true})
              if (slot_of(p.head, values) == s)
                slots_[std::size_t(s)]->add_gradient_columns(
                    (values ? p.v : p.k).middleRows(lo - p.first, hi - lo),
                    values ? p.d_vp : p.d_kp, lo, ws);
          }
          return;
        }
        task -= gradient_tasks;  // one part's d_k or d_v rows at positions [c0, …)
        const Index c0 = (task % blocks) * projection_block;
        ProjectionPart p = part(task / blocks / 2);
        const bool values = (task / blocks) % 2 == 1;
        const Index lo = std::max(c0, p.first);
        const Index hi = std::min(c0 + projection_block, p.first + p.k.rows());
        if (lo >= hi) return;
        const Index tokens = std::clamp<Index>(p.first + p.valid - lo, 0, hi - lo);
        View<S> dx = (values ? p.d_v : p.d_k).middleRows(lo - p.first, hi - lo);
        if (tokens > 0)
          slots_[std::size_t(slot_of(p.head, values))]->backward_rows(values ? p.d_vp : p.d_kp,
                                                                      dx.topRows(tokens), lo, ws);
        dx.bottomRows(hi - lo - tokens).setZero();
      });
      return tasks;
    } else {
      const auto run = [&](const ProjectionPart& p, bool values, Workspace& ws) {
        detail::require(p.first == 0, "LowRank", "part.first", p.first,
                        "0: only a projection with backward_rows (DenseProjection) takes shards");
        slots_[std::size_t(slot_of(p.head, values))]->backward(
            values ? p.v : p.k, p.valid, values ? p.d_vp : p.d_kp, values ? p.d_v : p.d_k, ws);
      };
      if constexpr (Proj::learned) {
        parallel_for(projections, threads, [&](Index s, int slot) {
          for (Index i = 0; i < parts; ++i) {
            const ProjectionPart p = part(i);
            for (const bool values : {false, true})
              if (slot_of(p.head, values) == s) run(p, values, workspace(slot));
          }
        });
        return projections;
      } else {
        parallel_for(2 * parts, threads, [&](Index task, int slot) {
          run(part(task / 2), task % 2 == 1, workspace(slot));
        });
        return 2 * parts;
      }
    }
  }
  /// Tokens per task of backward_projections.
  static constexpr Index projection_block = 128;

  /// The attention over the projected rows (FullAttention with the logit scale), and its
  /// context for a call whose sequence has n_k keys: pieces for mpi::SequenceParallel, which
  /// projects the shards of a sequence apart and sums the parts.
  const FullAttention<S>& attention() const { return attention_; }
  HeadContext projected_context(const HeadContext& ctx, Index n_k) const {
    return HeadContext{ctx.sequence,
                       ctx.head,
                       ctx.query_offset,
                       slots_.front()->visible_rows(n_k, ctx.key_length),
                       0,
                       false};
  }

 private:
  Index query_blocks(Index n_q, Index d_k, Index d_v) const {
    return (n_q + query_block_rows(d_k, d_v) - 1) / query_block_rows(d_k, d_v);
  }

  // Query block `block`'s part of backward (see backward_block).
  template <class Order>
  void query_block_backward(Index block, ConstView<S> q, Index n_k, ConstView<S> out,
                            ConstView<S> d_out, const Saved& saved, View<S> d_q,
                            const HeadContext& ctx, Workspace& ws, const Order& order,
                            S* shared) const {
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index r = saved.keys.rows(), d_k = saved.keys.cols(), d_v = saved.values.cols();
    const Index tile = query_block_rows(d_k, d_v), i0 = block * tile;
    const Index rows = std::min(tile, q.rows() - i0);
    auto d_kp = ws.matrix<S>(r, d_k);
    auto d_vp = ws.matrix<S>(r, d_v);
    HeadContext projected = projected_context(ctx, n_k);
    projected.query_offset = ctx.query_offset + i0;
    attention_.backward(q.middleRows(i0, rows), saved.keys, saved.values, out.middleRows(i0, rows),
                        d_out.middleRows(i0, rows), saved.attention, d_q.middleRows(i0, rows), d_kp,
                        d_vp, projected, ws);
    order([&] {
      Eigen::Map<Matrix<S>> sum_k(shared, r, d_k), sum_v(shared + r * d_k, r, d_v);
      if (block == 0) {
        sum_k = d_kp;
        sum_v = d_vp;
      } else {
        sum_k += d_kp;
        sum_v += d_vp;
      }
    });
  }

  Index projection_blocks(Index n_k) const {
    const Proj& p = *slots_.front();
    if constexpr (requires(Workspace & ws, ConstView<S> x, View<S> y) {
                    p.forward_rows(x, Index{}, y, Index{}, ws);
                  })
      return std::max<Index>(1, (p.rows(n_k) + projected_block_rows - 1) / projected_block_rows);
    else
      return 1;
  }
  /// Queries per block: whole query tiles of the attention, about 256 rows.
  Index query_block_rows(Index d_k, Index d_v) const {
    const Index grain = std::max<Index>(1, attention_.query_grain(d_k, d_v));
    return std::max<Index>(1, 256 / grain) * grain;
  }

  Index slot_count() const {
    switch (config_.sharing) {
      case ProjectionSharing::none:
        return Proj::learned ? 2 * layout_.heads : 1;
      case ProjectionSharing::headwise:
        return Proj::learned ? 2 : 1;
      default:
        return 1;
    }
  }

  std::size_t slot(Index head, bool values) const {
    return static_cast<std::size_t>(slot_of(head, values));
  }
  Index slot_of(Index head, bool values) const {
    if (slots_.size() == 1) return 0;
    if (config_.sharing == ProjectionSharing::headwise) return values ? 1 : 0;
    return 2 * head + (values ? 1 : 0);
  }

  // A (sequence, head)'s whole keys and values as a part of backward_projections, with the
  // gradients of its projected keys and values where its backward blocks summed them.
  ProjectionPart part_of(ConstView<S> k, ConstView<S> v, View<S> d_k, View<S> d_v,
                         const HeadContext& ctx, const S* shared) const {
    const Index r = slots_.front()->rows(k.rows());
    return ProjectionPart{ctx.head,
                          k,
                          v,
                          d_k,
                          d_v,
                          ctx.key_length,
                          0,
                          Eigen::Map<const Matrix<S>>(shared, r, k.cols()),
                          Eigen::Map<const Matrix<S>>(shared + r * k.cols(), r, v.cols())};
  }

  std::string slot_name(std::size_t s) const {
    if (config_.sharing != ProjectionSharing::none) return s == 0 ? "E" : "F";
    return detail::concat(s % 2 == 0 ? "E." : "F.", s / 2);
  }

  Config config_;
  HeadLayout layout_;
  FullAttention<S> attention_;
  std::vector<std::shared_ptr<Proj>> slots_;
  bool owns_shared_ = true;
};

namespace detail {

/// Linformer cannot be causal: say so in its own words.
template <class S, template <class> class Projection>
struct MaskingCheck<LowRank<S, Projection>, Causal> {
  static_assert(sizeof(S) == 0,
                "effattn: LowRank (Linformer) cannot be causal: its projections E, F mix all "
                "positions of the sequence, so every output would see future tokens. Use "
                "effattn::Bidirectional, or FullAttention / Favor for causal attention.");
};

}  // namespace detail

static_assert(AttentionPolicy<LowRank<float>>);
static_assert(AttentionPolicy<LowRank<double, MeanPooling>>);
static_assert(AttentionPolicy<LowRank<float, MaxPooling>>);
static_assert(AttentionPolicy<LowRank<double, ConvProjection>>);

}  // namespace effattn

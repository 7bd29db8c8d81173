#pragma once
// The forward kernel of exact attention in float: FlashAttention-2's loop on packed panels.

#include <algorithm>
#include <cstddef>
#include <limits>

#include "effattn/attention/full_attention/score_mods.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/core/finite.hpp"
#include "effattn/core/micro_kernel.hpp"
#include "effattn/core/simd.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail::full {

/// Query and key rows per tile of the packed kernel.
struct PackedTiles {
  Index query, key;
};

/// Workspace packed_forward takes.
inline std::size_t packed_forward_bytes(Index n_q, Index n_k, Index d_k, Index d_v, PackedTiles t) {
  using W = Workspace;
  const Index br = std::min(t.query, n_q), bc = kernel::padded(std::min(t.key, n_k));
  return W::bytes_for<float>(kernel::padded(n_k) * d_k) +  // K, packed transposed
         W::bytes_for<float>(kernel::padded(d_v) * n_k) +  // V, packed in column panels
         W::bytes_for<float>(br * d_k) +                   // the scaled query tile
         W::bytes_for<float>(br * bc) +                    // logits, then probabilities
         W::bytes_for<float>(br * kernel::padded(d_v)) +   // the output tile
         3 * W::bytes_for<float>(br);                      // running max, sum, rescale
}

/// out = softmax(s·q kᵀ + mask) v for one head (see FullAttention), writing each row's
/// log-sum-exp to lse when it is given. K and V are packed once per call into the panels the
/// micro-kernel streams; per query tile, every key tile runs S = Q·Kᵀ on the micro-kernel, the
/// mask (only on tiles the diagonal or the padding crosses), the online softmax step (native
/// exp) and O = rescale·O + P·V on the micro-kernel with the rescale folded into its store.
/// The keys query row i sees are [ctx.key_begin(i), ctx.key_end(i)) (HeadContext); key tiles no
/// row of a query tile sees are skipped, so a window of W keys costs n·W.
/// `mods` modify the scaled logits a row sees (ALiBi, soft-capping) before the softmax.
inline void packed_forward(ConstView<float> q, ConstView<float> k, ConstView<float> v,
                           View<float> out, float* lse, float scale, const HeadContext& ctx,
                           PackedTiles t, Workspace& ws, const ScoreMods<float>& mods = {}) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const Index n_q = q.rows(), d_k = q.cols(), d_v = v.cols(), keys = ctx.key_length;
  const Index dv_pad = kernel::padded(d_v), n_pad = std::max<Index>(keys, 1);
  Workspace::Frame frame(ws);
  float* kp = ws.take<float>(kernel::padded(keys) * d_k);
  float* vp = ws.take<float>(dv_pad * n_pad);
  kernel::pack_transposed(k.data(), k.outerStride(), keys, d_k, kp);
  kernel::pack_rows(v.data(), v.outerStride(), keys, d_v, vp);
  // A masked key gets probability 0, but 0 · ∞ or 0 · NaN in P·V would still reach the row:
  // when some value is not finite, masked tiles multiply each row by its visible keys only,
  // so that no output depends on a key it does not see (a later token, in causal attention).
  const bool exact_mask = !all_finite(v.topRows(keys));
  const bool modified = mods.active();
  const Index br = std::min(t.query, n_q),
              bc = kernel::padded(std::min(t.key, std::max<Index>(keys, 1)));
  float* qs = ws.take<float>(br * d_k);
  float* p = ws.take<float>(br * bc);
  float* o = ws.take<float>(br * dv_pad);
  float* m = ws.take<float>(br);
  float* l = ws.take<float>(br);
  float* alpha = ws.take<float>(br);

  for (Index i0 = 0; i0 < n_q; i0 += br) {
    const Index rows = std::min(br, n_q - i0);
    for (Index r = 0; r < rows; ++r) {
      const float* in = q.data() + (i0 + r) * q.outerStride();
      for (Index c = 0; c < d_k; ++c)
        qs[r * d_k + c] = scale * in[c];
    }
    std::fill(o, o + rows * dv_pad, 0.0f);
    std::fill(m, m + rows, neg_inf);
    std::fill(l, l + rows, 0.0f);
    // key_begin and key_end grow with the row: the first and last rows bound what any row sees,
    // and what every row does. Key tiles start on a whole panel of the packed keys.
    const Index last = i0 + rows - 1;
    const Index key_stop = ctx.key_end(last), all_stop = ctx.key_end(i0);
    const Index all_start = ctx.key_begin(last);
    const Index key_start = ctx.key_begin(i0) / kernel::panel * kernel::panel;
    for (Index j0 = key_start; j0 < key_stop; j0 += bc) {
      const Index cols = std::min(bc, key_stop - j0);
      kernel::gemm(rows, cols, d_k, {qs, d_k}, kp + j0 * d_k, kernel::panel * d_k, p, bc);
      const bool masked = j0 < all_start || j0 + cols > all_stop;
      for (Index r = 0; r < rows; ++r) {
        float* row = p + r * bc;
        if (!masked) {
          if (modified) mods.apply(row, cols, ctx.position(i0 + r), j0);
          alpha[r] = online_softmax_row(row, cols, m[r], l[r]);
          continue;
        }
        // The keys the row does not see get probability 0; the softmax runs on the rest.
        const auto [from, to] = ctx.columns_seen(i0 + r, j0, cols);
        std::fill(row, row + from, 0.0f);
        std::fill(row + to, row + cols, 0.0f);
        if (modified) mods.apply(row + from, to - from, ctx.position(i0 + r), j0 + from);
        alpha[r] = online_softmax_row(row + from, to - from, m[r], l[r]);
      }
      if (masked && exact_mask) {
        for (Index r = 0; r < rows; ++r) {
          const auto [from, to] = ctx.columns_seen(i0 + r, j0, cols);
          kernel::gemm(1, d_v, to - from, {p + r * bc + from, bc}, vp + (j0 + from) * kernel::panel,
                       kernel::panel * n_pad, o + r * dv_pad, dv_pad, kernel::Update::rescale,
                       alpha + r);
        }
        continue;
      }
      kernel::gemm(rows, d_v, cols, {p, bc}, vp + j0 * kernel::panel, kernel::panel * n_pad, o,
                   dv_pad, kernel::Update::rescale, alpha);
    }
    for (Index r = 0; r < rows; ++r) {
      // l is 0 only for a row that saw no key; NaN input keeps it NaN, and so the output.
      const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];
      float* dst = out.data() + (i0 + r) * out.outerStride();
      for (Index c = 0; c < d_v; ++c)
        dst[c] = l[r] == 0.0f ? 0.0f : o[r * dv_pad + c] * inv;
      if (lse) lse[i0 + r] = row_logsumexp(m[r], l[r]);
    }
  }
}

}  // namespace effattn::detail::full

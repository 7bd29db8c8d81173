#pragma once
// The backward kernel of exact attention in float: FlashAttention-2's backward on packed panels.

#include <algorithm>
#include <cstddef>

#include "effattn/attention/full_attention/packed_forward.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/core/micro_kernel.hpp"
#include "effattn/core/simd.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail::full {

/// Keys per tile of the packed backward: the key tile (whole panels, at most n_k rounded up).
inline Index packed_backward_block_keys(Index n_k, PackedTiles t) {
  return kernel::padded(std::min(t.key, std::max<Index>(n_k, 1)));
}
/// Key tiles of a head's backward.
inline Index packed_backward_key_tiles(Index n_k, PackedTiles t) {
  const Index bc = packed_backward_block_keys(n_k, t);
  return std::max<Index>(1, (n_k + bc - 1) / bc);
}
/// Blocks of a head's backward, one task each: every key tile alone, or, when causal, tile b
/// with tile T − 1 − b (an early tile, which every later query sees, with a late one, which few
/// do), so that the blocks cost about the same. (In a causal window every tile is seen by about
/// as many rows; pairs cost about the same there too, each tile reading only its own rows.)
inline Index packed_backward_blocks(Index n_k, PackedTiles t, bool causal) {
  const Index tiles = packed_backward_key_tiles(n_k, t);
  return causal ? (tiles + 1) / 2 : tiles;
}

/// Workspace one packed_backward_block takes: the packed copies of the query rows that see a
/// tile (q and d_out in column panels), one key tile's keys and values (packed transposed, and
/// k in column panels), the block's dQ parts (one per tile), one tile's dK and dV, two query ×
/// key tiles and D. Nothing n_q × n_k.
inline std::size_t packed_backward_bytes(Index n_q, Index n_k, Index d_k, Index d_v,
                                         PackedTiles t) {
  using W = Workspace;
  const Index dk_pad = kernel::padded(d_k), dv_pad = kernel::padded(d_v);
  const Index br = std::min(t.query, n_q), bc = packed_backward_block_keys(n_k, t);
  return W::bytes_for<float>(dk_pad * n_q) +            // q in column panels
         W::bytes_for<float>(dv_pad * n_q) +            // d_out in column panels
         W::bytes_for<float>(bc * d_k) +                // s·k, packed transposed
         W::bytes_for<float>(bc * d_v) +                // v, packed transposed
         W::bytes_for<float>(dk_pad * bc) +             // k in column panels
         2 * W::bytes_for<float>(n_q * dk_pad) +        // the block's parts of dq
         W::bytes_for<float>(bc * (dk_pad + dv_pad)) +  // one tile's dk and dv
         3 * W::bytes_for<float>(br * bc) +             // P, dS and the soft cap's slope
         W::bytes_for<float>(n_q);                      // D = rowsum(dO ∘ O)
}

/// One block of the gradients of out = softmax(s·q kᵀ + mask) v for one head, given each
/// row's log-sum-exp from the forward (FlashAttention-2's backward on packed panels). Query row
/// i sees keys [ctx.key_begin(i), ctx.key_end(i)) (HeadContext). The block holds one key tile
/// of bc keys (bc = packed_backward_block_keys), or two when causal (see
/// packed_backward_blocks), and overwrites their rows of d_k and d_v. Only the query rows that
/// see a tile are read for it (a window's few). Its part of d_q, Σ_j dS_ij K_j over each
/// tile's keys, is computed in scratch and added to d_q inside merge(step), which must run the
/// blocks' steps in block order: block 0 first sets d_q to 0, the last block scales it by s.
/// Per query tile that sees a key tile: P = exp(s·Q Kᵀ − lse) (masked), dV += Pᵀ dO,
/// dP = dO Vᵀ, dS = P ∘ (dP − D), dQ += dS K, dK += dSᵀ Q, every product on the
/// micro-kernel; Pᵀ and dSᵀ are read through strides, not copied. The scale s is folded into
/// the packed keys and applied once to dQ and dK. Every sum has the same order whatever thread
/// runs which block.
template <class Merge>
void packed_backward_block(Index block, ConstView<float> q, ConstView<float> k, ConstView<float> v,
                           ConstView<float> out, ConstView<float> d_out, const float* lse,
                           View<float> d_q, View<float> d_k, View<float> d_v, float scale,
                           const HeadContext& ctx, PackedTiles t, Workspace& ws, Merge&& merge,
                           const ScoreMods<float>& mods = {}) {
  constexpr Index panel = kernel::panel;
  const Index n_q = q.rows(), n_k = k.rows(), dk = q.cols(), dv = v.cols();
  const Index dk_pad = kernel::padded(dk), dv_pad = kernel::padded(dv);
  const Index key_length = ctx.key_length;
  const Index bc = packed_backward_block_keys(n_k, t);
  const Index key_tiles = packed_backward_key_tiles(n_k, t);
  const Index last = packed_backward_blocks(n_k, t, ctx.causal) - 1;
  const Index pair = ctx.causal ? key_tiles - 1 - block : block;
  const Index tiles[2] = {block, pair};
  const Index tile_count = pair == block ? 1 : 2;
  // key_begin and key_end grow with the row: the rows [first_row(j0), end_row(j1)) see some key
  // of [j0, j1), the rows before and after none.
  const auto search = [&](auto&& before) {  // the first row for which before(row) is false
    Index lo = 0, hi = n_q;
    while (lo < hi) {
      const Index mid = lo + (hi - lo) / 2;
      if (before(mid))
        lo = mid + 1;
      else
        hi = mid;
    }
    return lo;
  };
  struct Rows {
    Index from = 0, to = 0;
  };
  Rows rows_of[2];
  for (Index i = 0; i < tile_count; ++i) {
    const Index j0 = tiles[i] * bc, j1 = std::min(j0 + bc, key_length);
    if (j0 >= j1) continue;  // padding
    const Index from = search([&](Index r) { return ctx.key_end(r) <= j0; });
    const Index to = search([&](Index r) { return ctx.key_begin(r) < j1; });
    if (from < to) rows_of[i] = {from, to};
  }
  const auto seen = [&](Index i) { return rows_of[i].to - rows_of[i].from; };
  const Index dq_rows = seen(0) + seen(1);
  Workspace::Frame frame(ws);
  float* dq = dq_rows > 0 ? ws.take<float>(dq_rows * dk_pad) : nullptr;
  const auto finish = [&] {
    merge([&] {
      if (block == 0) d_q.setZero();
      const float* part = dq;
      for (Index i = 0; i < tile_count; ++i) {
        for (Index r = 0; r < seen(i); ++r) {
          float* gq = d_q.data() + (rows_of[i].from + r) * d_q.outerStride();
          for (Index x = 0; x < dk; ++x)
            gq[x] += part[r * dk_pad + x];
        }
        part += seen(i) * dk_pad;
      }
      if (block == last) d_q *= scale;
    });
  };
  float* qp = ws.take<float>(dk_pad * std::max(seen(0), seen(1)));
  float* dop = ws.take<float>(dv_pad * std::max(seen(0), seen(1)));
  float* kt = ws.take<float>(bc * dk);
  float* vt = ws.take<float>(bc * dv);
  float* kp = ws.take<float>(dk_pad * bc);
  const Index br = std::min(t.query, n_q);
  float* dk_tile = ws.take<float>(bc * dk_pad);
  float* dv_tile = ws.take<float>(bc * dv_pad);
  float* p = ws.take<float>(br * bc);
  float* ds = ws.take<float>(br * bc);
  const bool modified = mods.active(), capped = mods.cap != 0.0f;
  float* slope = capped ? ws.take<float>(br * bc) : nullptr;  // d(modified logit)/d(logit)
  float* delta = ws.take<float>(std::max(seen(0), seen(1)));
  if (dq) std::fill(dq, dq + dq_rows * dk_pad, 0.0f);
  const Index ld_out = d_out.outerStride();

  float* dq_part = dq;
  for (Index tile = 0; tile < tile_count; ++tile) {
    const Index j0 = tiles[tile] * bc, block_rows = std::clamp<Index>(n_k - j0, 0, bc);
    const Index cols = std::clamp<Index>(key_length - j0, 0, block_rows);  // keys, not padding
    const Index from = rows_of[tile].from, to = rows_of[tile].to, seen_rows = to - from;
    if (seen_rows == 0) {  // padding, or keys no query sees
      d_k.middleRows(j0, block_rows).setZero();
      d_v.middleRows(j0, block_rows).setZero();
      continue;
    }
    kernel::pack_rows(q.data() + from * q.outerStride(), q.outerStride(), seen_rows, dk, qp);
    kernel::pack_rows(d_out.data() + from * ld_out, ld_out, seen_rows, dv, dop);
    for (Index r = 0; r < seen_rows; ++r)
      delta[r] = d_out.row(from + r).dot(out.row(from + r));
    const float* k0 = k.data() + j0 * k.outerStride();
    kernel::pack_transposed(k0, k.outerStride(), cols, dk, kt, scale);
    kernel::pack_transposed(v.data() + j0 * v.outerStride(), v.outerStride(), cols, dv, vt);
    kernel::pack_rows(k0, k.outerStride(), cols, dk, kp);
    std::fill(dk_tile, dk_tile + cols * dk_pad, 0.0f);
    std::fill(dv_tile, dv_tile + cols * dv_pad, 0.0f);
    for (Index i0 = from; i0 < to; i0 += br) {
      const Index rows = std::min(br, to - i0), at = i0 - from;
      const bool masked = j0 + cols > ctx.key_end(i0) || j0 < ctx.key_begin(i0 + rows - 1);
      kernel::gemm(rows, cols, dk, {q.data() + i0 * q.outerStride(), q.outerStride()}, kt,
                   panel * dk, p, bc);
      for (Index r = 0; r < rows; ++r) {
        float* row = p + r * bc;
        float* d_mod = capped ? slope + r * bc : nullptr;
        if (!masked) {
          if (modified) mods.apply(row, cols, ctx.position(i0 + r), j0, d_mod);
          exp_shifted_sum(row, cols, lse[i0 + r]);  // +∞ for a row that sees nothing: all 0
          continue;
        }
        // The keys the row does not see get probability 0.
        const auto [begin, end] = ctx.columns_seen(i0 + r, j0, cols);
        std::fill(row, row + begin, 0.0f);
        std::fill(row + end, row + cols, 0.0f);
        if (capped) {
          std::fill(d_mod, d_mod + begin, 0.0f);
          std::fill(d_mod + end, d_mod + cols, 0.0f);
        }
        if (modified)
          mods.apply(row + begin, end - begin, ctx.position(i0 + r), j0 + begin,
                     capped ? d_mod + begin : nullptr);
        exp_shifted_sum(row + begin, end - begin, lse[i0 + r]);
      }
      // dV_j += Pᵀ dO_i
      kernel::gemm(cols, dv, rows, {p, 1, bc}, dop + at * panel, panel * seen_rows, dv_tile, dv_pad,
                   kernel::Update::add);
      // dP = dO_i V_jᵀ, then dS = P ∘ (dP − D)
      kernel::gemm(rows, cols, dv, {d_out.data() + i0 * ld_out, ld_out}, vt, panel * dv, ds, bc);
      for (Index r = 0; r < rows; ++r) {
        const float* pr = p + r * bc;
        float* dr = ds + r * bc;
        const float d = delta[at + r];
        Index c = 0;
        for (; c + simd::width <= cols; c += simd::width)
          simd::store(dr + c, simd::load(pr + c) * (simd::load(dr + c) - d));
        for (; c < cols; ++c)
          dr[c] = pr[c] * (dr[c] - d);
        if (capped) {  // through the cap: dS ∘ (1 − tanh²)
          const float* sr = slope + r * bc;
          for (c = 0; c < cols; ++c)
            dr[c] *= sr[c];
        }
      }
      // dQ_i += dS K_j and dK_j += dSᵀ Q_i (both scaled by s at the end)
      kernel::gemm(rows, dk, cols, {ds, bc}, kp, panel * cols, dq_part + at * dk_pad, dk_pad,
                   kernel::Update::add);
      kernel::gemm(cols, dk, rows, {ds, 1, bc}, qp + at * panel, panel * seen_rows, dk_tile, dk_pad,
                   kernel::Update::add);
    }
    dq_part += seen_rows * dk_pad;
    for (Index c = 0; c < cols; ++c) {
      float* gk = d_k.data() + (j0 + c) * d_k.outerStride();
      float* gv = d_v.data() + (j0 + c) * d_v.outerStride();
      for (Index x = 0; x < dk; ++x)
        gk[x] = scale * dk_tile[c * dk_pad + x];
      for (Index x = 0; x < dv; ++x)
        gv[x] = dv_tile[c * dv_pad + x];
    }
    // Keys past key_length (padding) get no gradient.
    d_k.middleRows(j0 + cols, block_rows - cols).setZero();
    d_v.middleRows(j0 + cols, block_rows - cols).setZero();
  }
  finish();
}

}  // namespace effattn::detail::full

#pragma once
// The backward kernel of exact attention in float: FlashAttention-2's backward on packed panels.

#include <algorithm>
#include <cstddef>
#include <limits>

#include "effattn/attention/full_attention/packed_forward.hpp"
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
/// do), so that the blocks cost about the same.
inline Index packed_backward_blocks(Index n_k, PackedTiles t, bool causal) {
  const Index tiles = packed_backward_key_tiles(n_k, t);
  return causal ? (tiles + 1) / 2 : tiles;
}

/// Workspace one packed_backward_block takes: the packed copies of the query rows that see the
/// block (q and d_out in column panels), one key tile's keys and values (packed transposed, and
/// k in column panels), the block's dQ part, one tile's dK and dV, two query × key tiles and D.
/// Nothing n_q × n_k.
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
         W::bytes_for<float>(n_q * dk_pad) +            // the block's part of dq
         W::bytes_for<float>(bc * (dk_pad + dv_pad)) +  // one tile's dk and dv
         2 * W::bytes_for<float>(br * bc) +             // P and dS
         W::bytes_for<float>(n_q);                      // D = rowsum(dO ∘ O)
}

/// One block of the gradients of out = softmax(s·q kᵀ + mask) v for one head, given each
/// row's log-sum-exp from the forward (FlashAttention-2's backward on packed panels). The block
/// holds one key tile of bc keys (bc = packed_backward_block_keys), or two when causal (see
/// packed_backward_blocks), and overwrites their rows of d_k and d_v. Its part of d_q,
/// Σ_j dS_ij K_j over its keys, is computed in scratch and added to d_q inside merge(step),
/// which must run the blocks' steps in block order: block 0 first sets d_q to 0, the last block
/// scales it by s. Per query tile that sees a key tile: P = exp(s·Q Kᵀ − lse) (masked),
/// dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D), dQ += dS K, dK += dSᵀ Q, every product on the
/// micro-kernel; Pᵀ and dSᵀ are read through strides, not copied. The scale s is folded into
/// the packed keys and applied once to dQ and dK. Every sum has the same order whatever thread
/// runs which block.
template <class KeyEnd, class Merge>
void packed_backward_block(Index block, ConstView<float> q, ConstView<float> k, ConstView<float> v,
                           ConstView<float> out, ConstView<float> d_out, const float* lse,
                           View<float> d_q, View<float> d_k, View<float> d_v, float scale,
                           Index key_length, KeyEnd&& key_end, PackedTiles t, bool causal,
                           Workspace& ws, Merge&& merge) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  constexpr Index panel = kernel::panel;
  const Index n_q = q.rows(), n_k = k.rows(), dk = q.cols(), dv = v.cols();
  const Index dk_pad = kernel::padded(dk), dv_pad = kernel::padded(dv);
  const Index bc = packed_backward_block_keys(n_k, t);
  const Index key_tiles = packed_backward_key_tiles(n_k, t);
  const Index last = packed_backward_blocks(n_k, t, causal) - 1;
  const Index pair = causal ? key_tiles - 1 - block : block;
  const Index tiles[2] = {block, pair};
  const Index tile_count = pair == block ? 1 : 2;
  // key_end grows with the row: the rows from first_row(j0) on see key j0, the rows before none.
  const auto first_row = [&](Index j0) {
    if (j0 >= key_length) return n_q;
    Index lo = 0, hi = n_q;
    while (lo < hi) {
      const Index mid = lo + (hi - lo) / 2;
      if (key_end(mid) > j0)
        hi = mid;
      else
        lo = mid + 1;
    }
    return lo;
  };
  const Index i_first = first_row(block * bc);  // the block's first tile is its earliest
  const Index seen_rows = n_q - i_first;
  const auto finish = [&](const float* dq) {
    merge([&] {
      if (block == 0) d_q.setZero();
      for (Index r = 0; dq && r < seen_rows; ++r) {
        float* gq = d_q.data() + (i_first + r) * d_q.outerStride();
        for (Index x = 0; x < dk; ++x)
          gq[x] += dq[r * dk_pad + x];
      }
      if (block == last) d_q *= scale;
    });
  };
  if (seen_rows == 0) {  // padding, or keys no query sees
    for (Index i = 0; i < tile_count; ++i) {
      const Index j0 = tiles[i] * bc, rows = std::clamp<Index>(n_k - j0, 0, bc);
      d_k.middleRows(j0, rows).setZero();
      d_v.middleRows(j0, rows).setZero();
    }
    finish(nullptr);
    return;
  }
  Workspace::Frame frame(ws);
  float* qp = ws.take<float>(dk_pad * seen_rows);
  float* dop = ws.take<float>(dv_pad * seen_rows);
  float* kt = ws.take<float>(bc * dk);
  float* vt = ws.take<float>(bc * dv);
  float* kp = ws.take<float>(dk_pad * bc);
  kernel::pack_rows(q.data() + i_first * q.outerStride(), q.outerStride(), seen_rows, dk, qp);
  kernel::pack_rows(d_out.data() + i_first * d_out.outerStride(), d_out.outerStride(), seen_rows,
                    dv, dop);
  const Index br = std::min(t.query, n_q);
  float* dq = ws.take<float>(seen_rows * dk_pad);
  float* dk_tile = ws.take<float>(bc * dk_pad);
  float* dv_tile = ws.take<float>(bc * dv_pad);
  float* p = ws.take<float>(br * bc);
  float* ds = ws.take<float>(br * bc);
  float* delta = ws.take<float>(seen_rows);
  for (Index r = 0; r < seen_rows; ++r)
    delta[r] = d_out.row(i_first + r).dot(out.row(i_first + r));
  std::fill(dq, dq + seen_rows * dk_pad, 0.0f);
  const Index ld_out = d_out.outerStride();

  for (Index tile = 0; tile < tile_count; ++tile) {
    const Index j0 = tiles[tile] * bc, block_rows = std::clamp<Index>(n_k - j0, 0, bc);
    const Index cols = std::clamp<Index>(key_length - j0, 0, block_rows);  // keys, not padding
    const Index from = std::max(first_row(j0), i_first);
    const float* k0 = k.data() + j0 * k.outerStride();
    kernel::pack_transposed(k0, k.outerStride(), cols, dk, kt, scale);
    kernel::pack_transposed(v.data() + j0 * v.outerStride(), v.outerStride(), cols, dv, vt);
    kernel::pack_rows(k0, k.outerStride(), cols, dk, kp);
    std::fill(dk_tile, dk_tile + cols * dk_pad, 0.0f);
    std::fill(dv_tile, dv_tile + cols * dv_pad, 0.0f);
    for (Index i0 = from; i0 < n_q; i0 += br) {
      const Index rows = std::min(br, n_q - i0), at = i0 - i_first;
      const bool masked = j0 + cols > key_end(i0);
      kernel::gemm(rows, cols, dk, {q.data() + i0 * q.outerStride(), q.outerStride()}, kt,
                   panel * dk, p, bc);
      for (Index r = 0; r < rows; ++r) {
        float* row = p + r * bc;
        if (masked) {
          const Index visible = std::clamp<Index>(key_end(i0 + r) - j0, 0, cols);
          std::fill(row + visible, row + cols, neg_inf);
        }
        exp_shifted_sum(row, cols, lse[i0 + r]);  // +∞ for a row that sees nothing: all 0
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
      }
      // dQ_i += dS K_j and dK_j += dSᵀ Q_i (both scaled by s at the end)
      kernel::gemm(rows, dk, cols, {ds, bc}, kp, panel * cols, dq + at * dk_pad, dk_pad,
                   kernel::Update::add);
      kernel::gemm(cols, dk, rows, {ds, 1, bc}, qp + at * panel, panel * seen_rows, dk_tile, dk_pad,
                   kernel::Update::add);
    }
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
  finish(dq);
}

}  // namespace effattn::detail::full

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

/// Workspace packed_backward takes: the five packed copies of q, k, v and d_out the products
/// stream (O(n·d), like the inputs), dq's accumulator, one key tile's dk and dv, and two
/// query × key tiles. Nothing n_q × n_k.
inline std::size_t packed_backward_bytes(Index n_q, Index n_k, Index d_k, Index d_v,
                                         PackedTiles t) {
  using W = Workspace;
  const Index dk_pad = kernel::padded(d_k), dv_pad = kernel::padded(d_v);
  const Index br = std::min(t.query, n_q), bc = kernel::padded(std::min(t.key, n_k));
  return W::bytes_for<float>(dk_pad * n_q) +               // q in column panels
         W::bytes_for<float>(dv_pad * n_q) +               // d_out in column panels
         W::bytes_for<float>(kernel::padded(n_k) * d_k) +  // s·k, packed transposed
         W::bytes_for<float>(kernel::padded(n_k) * d_v) +  // v, packed transposed
         W::bytes_for<float>(dk_pad * n_k) +               // k in column panels
         W::bytes_for<float>(n_q * dk_pad) +               // dq accumulator
         W::bytes_for<float>(bc * (dk_pad + dv_pad)) +     // one key tile's dk and dv
         2 * W::bytes_for<float>(br * bc) +                // P and dS
         W::bytes_for<float>(n_q);                         // D = rowsum(dO ∘ O)
}

/// Gradients of out = softmax(s·q kᵀ + mask) v for one head, given each row's log-sum-exp
/// from the forward: overwrites d_q, d_k, d_v. Per key tile (outer loop), per query tile:
/// P = exp(s·Q Kᵀ − lse) (masked), dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D),
/// dQ += dS K, dK += dSᵀ Q, every product on the micro-kernel; Pᵀ and dSᵀ are read through
/// strides, not copied. The scale s is folded into the packed keys (so S needs no scaled copy
/// of q) and applied once to dQ and dK at the end.
template <class KeyEnd>
void packed_backward(ConstView<float> q, ConstView<float> k, ConstView<float> v,
                     ConstView<float> out, ConstView<float> d_out, const float* lse,
                     View<float> d_q, View<float> d_k, View<float> d_v, float scale,
                     Index key_length, KeyEnd&& key_end, PackedTiles t, Workspace& ws) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  constexpr Index panel = kernel::panel;
  const Index n_q = q.rows(), dk = q.cols(), dv = v.cols(), keys = key_length;
  const Index dk_pad = kernel::padded(dk), dv_pad = kernel::padded(dv);
  const Index key_rows = std::max<Index>(keys, 1);  // panel stride of k's column panels
  Workspace::Frame frame(ws);
  float* qp = ws.take<float>(dk_pad * n_q);
  float* dop = ws.take<float>(dv_pad * n_q);
  float* kt = ws.take<float>(kernel::padded(keys) * dk);
  float* vt = ws.take<float>(kernel::padded(keys) * dv);
  float* kp = ws.take<float>(dk_pad * key_rows);
  kernel::pack_rows(q.data(), q.outerStride(), n_q, dk, qp);
  kernel::pack_rows(d_out.data(), d_out.outerStride(), n_q, dv, dop);
  kernel::pack_transposed(k.data(), k.outerStride(), keys, dk, kt, scale);
  kernel::pack_transposed(v.data(), v.outerStride(), keys, dv, vt);
  kernel::pack_rows(k.data(), k.outerStride(), keys, dk, kp);
  const Index br = std::min(t.query, n_q), bc = kernel::padded(std::min(t.key, key_rows));
  float* dq = ws.take<float>(n_q * dk_pad);
  float* dk_tile = ws.take<float>(bc * dk_pad);
  float* dv_tile = ws.take<float>(bc * dv_pad);
  float* p = ws.take<float>(br * bc);
  float* ds = ws.take<float>(br * bc);
  float* delta = ws.take<float>(n_q);
  for (Index r = 0; r < n_q; ++r)
    delta[r] = d_out.row(r).dot(out.row(r));
  std::fill(dq, dq + n_q * dk_pad, 0.0f);
  const float* dout = d_out.data();
  const Index ld_out = d_out.outerStride();

  for (Index j0 = 0; j0 < keys; j0 += bc) {
    const Index cols = std::min(bc, keys - j0);
    std::fill(dk_tile, dk_tile + cols * dk_pad, 0.0f);
    std::fill(dv_tile, dv_tile + cols * dv_pad, 0.0f);
    for (Index i0 = 0; i0 < n_q; i0 += br) {
      const Index rows = std::min(br, n_q - i0);
      // key_end grows with the row: the last row bounds what any row sees, the first what all do.
      if (j0 >= key_end(i0 + rows - 1)) continue;  // wholly above the causal diagonal
      const bool masked = j0 + cols > key_end(i0);
      kernel::gemm(rows, cols, dk, {q.data() + i0 * q.outerStride(), q.outerStride()}, kt + j0 * dk,
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
      kernel::gemm(cols, dv, rows, {p, 1, bc}, dop + i0 * panel, panel * n_q, dv_tile, dv_pad,
                   kernel::Update::add);
      // dP = dO_i V_jᵀ, then dS = P ∘ (dP − D)
      kernel::gemm(rows, cols, dv, {dout + i0 * ld_out, ld_out}, vt + j0 * dv, panel * dv, ds, bc);
      for (Index r = 0; r < rows; ++r) {
        const float* pr = p + r * bc;
        float* dr = ds + r * bc;
        const float d = delta[i0 + r];
        Index c = 0;
        for (; c + simd::width <= cols; c += simd::width)
          simd::store(dr + c, simd::load(pr + c) * (simd::load(dr + c) - d));
        for (; c < cols; ++c)
          dr[c] = pr[c] * (dr[c] - d);
      }
      // dQ_i += dS K_j and dK_j += dSᵀ Q_i (both scaled by s at the end)
      kernel::gemm(rows, dk, cols, {ds, bc}, kp + j0 * panel, panel * key_rows, dq + i0 * dk_pad,
                   dk_pad, kernel::Update::add);
      kernel::gemm(cols, dk, rows, {ds, 1, bc}, qp + i0 * panel, panel * n_q, dk_tile, dk_pad,
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
  }
  // Keys past key_length (padding) get no gradient.
  d_k.bottomRows(d_k.rows() - keys).setZero();
  d_v.bottomRows(d_v.rows() - keys).setZero();
  for (Index r = 0; r < n_q; ++r) {
    float* gq = d_q.data() + r * d_q.outerStride();
    for (Index x = 0; x < dk; ++x)
      gq[x] = scale * dq[r * dk_pad + x];
  }
}

}  // namespace effattn::detail::full

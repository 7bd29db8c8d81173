#pragma once
// A register-blocked matrix micro-kernel on packed panels (float, native SIMD width), and the
// packing that feeds it: the engine of the attention kernels' products.
//
// C[m × n] (+)= A[m × k] · B[k × n], with A row-major (any row stride) and B packed into
// panels of `panel` columns: panel p holds rows 0 … k−1 of columns p·panel … p·panel + panel − 1,
// row after row (k × panel floats, contiguous; columns past n are zero). Each micro-tile keeps
// `tile_rows` × `panel` accumulators in registers for the whole depth k, broadcasting one
// element of A per row and streaming one row of the panel per step (the shape of BLIS's and
// MLAS's kernels). A is read through two strides, so a row-major matrix and the transpose of
// one (attention's backward needs Pᵀ and dSᵀ) feed it without a copy. The product is stored,
// added (C += A·B), or added to a rescaled C (C = diag(scale)·C + A·B: attention's output
// rescale, folded into the store).

#include <algorithm>
#include <cstddef>
#include <utility>

#include "effattn/core/simd.hpp"
#include "effattn/core/types.hpp"

namespace effattn::detail::kernel {

#if defined(__GNUC__)
using simd::Vec;
inline constexpr int lanes = simd::width;
/// Vectors per micro-tile row, and the columns of a panel.
inline constexpr int vectors = 2;
inline constexpr Index panel = vectors * lanes;
/// Rows per micro-tile: as many as the registers hold next to two panel vectors and a
/// broadcast (32 vector registers with AVX-512, 16 otherwise).
inline constexpr Index tile_rows = lanes == 16 ? 12 : 6;
#else
inline constexpr Index panel = 8;
inline constexpr Index tile_rows = 4;
#endif

/// The left operand: A[i][t] = data[i·row_stride + t·depth_stride]. Row-major A has
/// depth_stride 1; the transpose of a row-major matrix with row stride ld has row_stride 1 and
/// depth_stride ld.
struct Rows {
  const float* data;
  Index row_stride;
  Index depth_stride = 1;
};

/// How the product reaches C.
enum class Update {
  assign,   ///< C = A·B
  add,      ///< C += A·B
  rescale,  ///< C = diag(scale)·C + A·B
};

/// Columns rounded up to whole panels.
constexpr Index padded(Index cols) {
  return (cols + panel - 1) / panel * panel;
}

/// Packs columns [0, cols) of the rows of `src` (rows × ≥cols, row stride ld), transposed:
/// dst gets src's columns as panel rows, i.e. B = srcᵀ (for S = Q·Kᵀ with src = K: panel p is
/// keys p·panel …, row t of a panel is feature t). `rows` keys, `depth` = cols features.
/// dst: padded(rows) × depth floats, each multiplied by `scale`.
inline void pack_transposed(const float* src, Index ld, Index rows, Index depth, float* dst,
                            float scale = 1.0f) {
  for (Index p0 = 0; p0 < rows; p0 += panel) {
    const Index width = std::min<Index>(panel, rows - p0);
    float* out = dst + p0 * depth;
    for (Index t = 0; t < depth; ++t) {
      for (Index c = 0; c < width; ++c)
        out[t * panel + c] = scale * src[(p0 + c) * ld + t];
      for (Index c = width; c < panel; ++c)
        out[t * panel + c] = 0.0f;
    }
  }
}

/// Packs the rows of `src` (rows × cols, row stride ld) as B = src: panel p holds columns
/// p·panel … of every row. dst: padded(cols) × rows floats; panel p starts at p·rows·panel.
inline void pack_rows(const float* src, Index ld, Index rows, Index cols, float* dst) {
  for (Index p0 = 0; p0 < cols; p0 += panel) {
    const Index width = std::min<Index>(panel, cols - p0);
    float* out = dst + p0 * rows;
    for (Index r = 0; r < rows; ++r) {
      const float* in = src + r * ld + p0;
      for (Index c = 0; c < width; ++c)
        out[r * panel + c] = in[c];
      for (Index c = width; c < panel; ++c)
        out[r * panel + c] = 0.0f;
    }
  }
}

#if defined(__GNUC__)
/// One micro-tile: M rows of A times one panel of B over depth k, into c (row stride ldc,
/// `panel` columns written, or `cols` < panel for the last panel), updated as U says.
template <int M, Update U>
[[gnu::always_inline]] inline void micro_tile(Index k, Rows a, const float* b, float* c, Index ldc,
                                              Index cols, const float* scale) {
  Vec acc[M][vectors] = {};
  const float* at = a.data;
  for (Index t = 0; t < k; ++t, at += a.depth_stride) {
    const Vec b0 = simd::load(b + t * panel), b1 = simd::load(b + t * panel + lanes);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      const float ai = at[i * a.row_stride];
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
    float* row = c + i * ldc;
    if (cols == panel) {
      for (int v = 0; v < vectors; ++v) {
        Vec out = acc[i][v];
        if constexpr (U == Update::add) out += simd::load(row + v * lanes);
        if constexpr (U == Update::rescale) out += scale[i] * simd::load(row + v * lanes);
        simd::store(row + v * lanes, out);
      }
    } else {
      for (Index j = 0; j < cols; ++j) {
        const float x = acc[i][j / lanes][j % lanes];
        if constexpr (U == Update::assign) row[j] = x;
        if constexpr (U == Update::add) row[j] += x;
        if constexpr (U == Update::rescale) row[j] = scale[i] * row[j] + x;
      }
    }
  }
}

template <int M, Update U>
void rows_of_tiles(Index m, Index n, Index k, Rows a, const float* b, Index panel_stride, float* c,
                   Index ldc, const float* scale) {
  for (Index p0 = 0, p = 0; p0 < n; p0 += panel, ++p) {
    const Index cols = std::min<Index>(panel, n - p0);
    const float* bp = b + p * panel_stride;
    Index i = 0;
    const auto rows_from = [&](Index first) {
      return Rows{a.data + first * a.row_stride, a.row_stride, a.depth_stride};
    };
    for (; i + M <= m; i += M)
      micro_tile<M, U>(k, rows_from(i), bp, c + i * ldc + p0, ldc, cols,
                       scale ? scale + i : nullptr);
    const Index rest = m - i;
    if (rest == 0) continue;
    [&]<int... R>(std::integer_sequence<int, R...>) {
      ((rest == R + 1 ? micro_tile<R + 1, U>(k, rows_from(i), bp, c + i * ldc + p0, ldc, cols,
                                             scale ? scale + i : nullptr)
                      : void()),
       ...);
    }
    (std::make_integer_sequence<int, M - 1>{});
  }
}
#endif

/// C[m × n] (update) A[m × k]·B. B is packed: panel p (columns p·panel …) starts at
/// b + p·panel_stride and holds k rows of `panel` floats. `scale` (m values) is read only by
/// Update::rescale.
inline void gemm(Index m, Index n, Index k, Rows a, const float* b, Index panel_stride, float* c,
                 Index ldc, Update update = Update::assign, const float* scale = nullptr) {
#if defined(__GNUC__)
  constexpr int M = int(tile_rows);
  switch (update) {
    case Update::assign:
      return rows_of_tiles<M, Update::assign>(m, n, k, a, b, panel_stride, c, ldc, scale);
    case Update::add:
      return rows_of_tiles<M, Update::add>(m, n, k, a, b, panel_stride, c, ldc, scale);
    case Update::rescale:
      return rows_of_tiles<M, Update::rescale>(m, n, k, a, b, panel_stride, c, ldc, scale);
  }
#else
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      const float* bp = b + (j / panel) * panel_stride + j % panel;
      float x = 0;
      for (Index t = 0; t < k; ++t)
        x += a.data[i * a.row_stride + t * a.depth_stride] * bp[t * panel];
      float& out = c[i * ldc + j];
      out = update == Update::assign ? x : update == Update::add ? out + x : scale[i] * out + x;
    }
#endif
}

}  // namespace effattn::detail::kernel

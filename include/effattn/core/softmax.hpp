#pragma once
// Online (streaming) softmax over tiles of logits: FlashAttention's running max and sum.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "effattn/core/types.hpp"

namespace effattn::detail {

#if defined(__GNUC__)  // GCC and Clang: explicit SIMD through vector extensions
using Floats16 = float __attribute__((vector_size(64)));
using Ints16 = std::int32_t __attribute__((vector_size(64)));

/// exp of 16 floats: Cody–Waite reduction x = k·ln2 + r, |r| ≤ ln2/2, then a degree-6
/// polynomial (relative error < 3e-7 over the range softmax uses, x ≤ 0). x below −87
/// (including −∞, a masked logit) gives exactly 0; NaN stays NaN.
/// Why not Eigen's exp: this one does the same job in ~24 vector instructions, which makes
/// the softmax between the two products of attention about 1.5× cheaper.
/// (By reference: 64-byte vectors passed by value have a target-dependent ABI, and GCC
/// warns about that in every translation unit built without AVX-512.)
[[gnu::always_inline]] inline void exp_nonpositive(const Floats16& x, Floats16& e) {
  constexpr float lo = -87.0f, log2e = 1.44269504088896341f;
  constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  const Floats16 xc = x > lo ? x : lo;  // also maps NaN to lo, so the int conversion is defined
  const Ints16 k = __builtin_convertvector(xc * log2e - 0.5f, Ints16);  // round(x/ln2), x ≤ 0
  const Floats16 kf = __builtin_convertvector(k, Floats16);
  const Floats16 r = (xc - kf * ln2_hi) - kf * ln2_lo;
  Floats16 p = r * (1.0f / 720) + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  e = reinterpret_cast<Floats16>(reinterpret_cast<Ints16>(p) + (k << 23));
  e = x < lo ? 0.0f : e;
  e = x != x ? x : e;
}
#endif

/// row[j] ← exp(row[j] − shift) for j < n; returns the sum of the new values.
/// For softmax, shift is at least the row maximum, so every argument is ≤ 0.
template <class S>
S exp_shifted_sum(S* row, Index n, S shift) {
#if defined(__GNUC__)
  if constexpr (std::is_same_v<S, float>) {
    Floats16 acc = {};
    Index j = 0;
    for (; j + 16 <= n; j += 16) {
      Floats16 x;
      std::memcpy(&x, row + j, sizeof x);
      x -= shift;
      Floats16 e;
      exp_nonpositive(x, e);
      std::memcpy(row + j, &e, sizeof e);
      acc += e;
    }
    float sum = 0;
    if (j < n) {  // the tail, padded with −∞ (which gives 0)
      Floats16 x;
      for (int i = 0; i < 16; ++i)
        x[i] = j + i < n ? row[j + i] - shift : -std::numeric_limits<float>::infinity();
      Floats16 e;
      exp_nonpositive(x, e);
      for (Index i = 0; j + i < n; ++i)
        row[j + i] = e[i];
      acc += e;
    }
    for (int i = 0; i < 16; ++i)
      sum += acc[i];
    return sum;
  }
#endif
  // Eigen's exp clamps its argument, so −∞ would give a tiny positive number: select 0.
  Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>> values(row, n);
  const S lowest = std::log(std::numeric_limits<S>::denorm_min());
  values = (values - shift < lowest).select(S(0), (values - shift).exp());
  return values.sum();
}

/// One step of the online softmax over a tile of logits (rows = queries).
/// For each row r: m' = max(m[r], max_j logits(r, j)); logits(r, :) ← exp(logits − m');
/// rescale[r] = exp(m[r] − m'); sum[r] ← rescale[r]·sum[r] + Σ_j exp(logits − m'); m[r] ← m'.
/// A row whose logits are all −∞ so far (masked) keeps m = −∞, gets zeros and rescale 1,
/// so a fully masked row never produces NaN.
template <class S, class Tile>
void online_softmax_step(Tile& logits, S* m, S* sum, S* rescale) {
  constexpr S neg_inf = -std::numeric_limits<S>::infinity();
  for (Index r = 0; r < logits.rows(); ++r) {
    auto row = logits.row(r).array();
    // PropagateNaN so that a NaN logit reaches the output instead of being masked away.
    const S row_max = row.template maxCoeff<Eigen::PropagateNaN>();
    const S m_new = (row_max > m[r] || std::isnan(row_max)) ? row_max : m[r];
    if (m_new == neg_inf) {
      row.setZero();
      rescale[r] = S(1);
      continue;
    }
    const S row_sum = exp_shifted_sum(&logits(r, 0), logits.cols(), m_new);
    rescale[r] = std::exp(m[r] - m_new);
    sum[r] = rescale[r] * sum[r] + row_sum;
    m[r] = m_new;
  }
}

/// log-sum-exp of a finished row from its running max and sum; +∞ marks an empty
/// (fully masked) row, so that exp(logit − lse) = 0 for it in the backward pass.
template <class S>
S row_logsumexp(S m, S sum) {
  return sum == S(0) ? std::numeric_limits<S>::infinity() : m + std::log(sum);
}

}  // namespace effattn::detail

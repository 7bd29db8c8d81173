#pragma once
// Online (streaming) softmax over tiles of logits: FlashAttention's running max and sum.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "effattn/core/simd.hpp"
#include "effattn/core/types.hpp"

namespace effattn::detail {

/// row[j] ← exp(row[j] − shift) for j < n; returns the sum of the new values.
/// For softmax, shift is at least the row maximum, so every argument is ≤ 0.
template <class S>
S exp_shifted_sum(S* row, Index n, S shift) {
  if constexpr (std::is_same_v<S, float> && simd::enabled) {
    using simd::Vec;
    constexpr int w = simd::width;
    Vec acc = {};
    Index j = 0;
    for (; j + w <= n; j += w) {
      const Vec e = simd::exp_nonpositive(simd::load(row + j) - shift);
      simd::store(row + j, e);
      acc += e;
    }
    if (j < n) {  // the tail, padded with −∞ (which gives 0)
      Vec x = simd::broadcast(-std::numeric_limits<float>::infinity());
      for (Index i = 0; j + i < n; ++i)
        x[i] = row[j + i] - shift;
      const Vec e = simd::exp_nonpositive(x);
      for (Index i = 0; j + i < n; ++i)
        row[j + i] = e[i];
      acc += e;
    }
    return simd::sum(acc);
  }
  // Eigen's exp clamps its argument, so −∞ would give a tiny positive number: select 0.
  Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>> values(row, n);
  const S lowest = std::log(std::numeric_limits<S>::denorm_min());
  values = (values - shift < lowest).select(S(0), (values - shift).exp());
  return values.sum();
}

/// The largest of row[0 … n) (−∞ for n = 0). NaN-agnostic on the fast path: a NaN logit is
/// skipped here but reaches the output through exp and the row sum; only a row whose logits
/// are all NaN returns NaN, found by a second look when nothing else was seen.
template <class S>
S max_of(const S* row, Index n) {
  constexpr S neg_inf = -std::numeric_limits<S>::infinity();
  S best = neg_inf;
  Index j = 0;
  if constexpr (std::is_same_v<S, float> && simd::enabled) {
    using simd::Vec;
    constexpr int w = simd::width;
    const auto larger = [](Vec a, Vec b) { return a > b ? a : b; };
    Vec m0 = simd::broadcast(neg_inf), m1 = m0, m2 = m0, m3 = m0;  // four independent chains
    for (; j + 4 * w <= n; j += 4 * w) {
      m0 = larger(m0, simd::load(row + j));
      m1 = larger(m1, simd::load(row + j + w));
      m2 = larger(m2, simd::load(row + j + 2 * w));
      m3 = larger(m3, simd::load(row + j + 3 * w));
    }
    for (; j + w <= n; j += w)
      m0 = larger(m0, simd::load(row + j));
    best = simd::fold(larger(larger(m0, m1), larger(m2, m3)), larger);
  }
  for (; j < n; ++j)
    best = row[j] > best ? row[j] : best;
  if (best == neg_inf)
    for (Index i = 0; i < n; ++i)
      if (row[i] != row[i]) return row[i];
  return best;
}

/// One row of the online softmax: with m' = max(m, max_j row[j]), row[j] ← exp(row[j] − m'),
/// sum ← rescale·sum + Σ_j row[j] and m ← m', where rescale = exp(m − m') is returned (1, with
/// no exp, when the maximum did not rise). A row whose logits are all −∞ so far (masked) keeps
/// m = −∞, gets zeros and rescale 1, so a fully masked row never produces NaN; a NaN logit
/// reaches the sum (and the output) through exp.
template <class S>
S online_softmax_row(S* row, Index n, S& m, S& sum) {
  const S row_max = max_of(row, n);
  const S m_new = (row_max > m || row_max != row_max) ? row_max : m;
  if (m_new == -std::numeric_limits<S>::infinity()) {
    std::fill(row, row + n, S(0));
    return S(1);
  }
  const S row_sum = exp_shifted_sum(row, n, m_new);
  const S rescale = m_new == m ? S(1) : S(std::exp(m - m_new));
  sum = rescale * sum + row_sum;
  m = m_new;
  return rescale;
}

/// One step of the online softmax over a row-major tile of logits (rows = queries):
/// online_softmax_row on each row, rescale[r] receiving its factor.
template <class S, class Tile>
void online_softmax_step(Tile& logits, S* m, S* sum, S* rescale) {
  for (Index r = 0; r < logits.rows(); ++r)
    rescale[r] = online_softmax_row(&logits(r, 0), logits.cols(), m[r], sum[r]);
}

/// log-sum-exp of a finished row from its running max and sum; +∞ marks an empty
/// (fully masked) row, so that exp(logit − lse) = 0 for it in the backward pass.
template <class S>
S row_logsumexp(S m, S sum) {
  return sum == S(0) ? std::numeric_limits<S>::infinity() : m + std::log(sum);
}

/// The library's one merge of partial softmax attention (decoding's cache blocks, ring
/// attention's key shards): rows of `out` hold attention normalised over the keys merged so far,
/// whose log-sum-exp is lse (−∞: none yet, out's row then ignored); rows of `o` the attention
/// over another set of keys, log-sum-exp l (+∞: the row saw none of them). Afterwards out and lse
/// are those of both sets together. The order of merges decides the rounding: callers merge in a
/// fixed order for reproducible bits.
template <class S, class Out, class O>
void merge_softmax_rows(Out&& out, const O& o, S* lse, const S* l, Index rows) {
  for (Index r = 0; r < rows; ++r) {
    if (l[r] == std::numeric_limits<S>::infinity()) continue;
    if (lse[r] == -std::numeric_limits<S>::infinity()) {
      out.row(r) = o.row(r);
      lse[r] = l[r];
      continue;
    }
    const S top = std::max(lse[r], l[r]);
    const S a = std::exp(lse[r] - top), c = std::exp(l[r] - top), sum = a + c;
    out.row(r) = (a / sum) * out.row(r) + (c / sum) * o.row(r);
    lse[r] = top + std::log(sum);
  }
}

/// The same merge for partial results kept unnormalised: a row's running max m, sum z of
/// exp(logit − m) and out = Σ exp(logit − m)·v, and another set of keys' m_part, z_part, o_part
/// (z_part = 0: it saw none). LSH's rounds and mpi::ShardedLSH's ranks merge this way, because
/// their rows may see only their own key (logit −1e5), where float cannot hold m + log z to
/// the precision backward needs; m = −∞, z = 0 starts a row. `f` is exp(−|m − m_part|), the
/// factor of the part with the smaller max (exp of merge_exponent, computed here or for many rows
/// at once).
template <class S, class Out, class O>
void merge_unnormalised_row(Out&& out, S& m, S& z, const O& o_part, S m_part, S z_part, S f) {
  if (z_part == S(0)) return;
  if (m == -std::numeric_limits<S>::infinity()) {  // the first part: what f = 0 would give
    out = o_part;
    z = z_part;
    m = m_part;
  } else if (m_part > m) {
    out = f * out + o_part;
    z = f * z + z_part;
    m = m_part;
  } else {
    out += f * o_part;
    z += f * z_part;
  }
}
/// The exponent of merge_unnormalised_row's factor (0 for a row's first part).
template <class S>
S merge_exponent(S m, S m_part) {
  return m == -std::numeric_limits<S>::infinity() ? S(0) : -std::abs(m - m_part);
}
/// merge_unnormalised_row with its factor computed here.
template <class S, class Out, class O>
void merge_unnormalised_row(Out&& out, S& m, S& z, const O& o_part, S m_part, S z_part) {
  merge_unnormalised_row(out, m, z, o_part, m_part, z_part, std::exp(merge_exponent(m, m_part)));
}

}  // namespace effattn::detail

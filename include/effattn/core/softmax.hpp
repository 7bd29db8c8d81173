#pragma once
// Online (streaming) softmax over tiles of logits: FlashAttention's running max and sum.

#include <cmath>
#include <limits>

#include "effattn/core/types.hpp"

namespace effattn::detail {

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
    row = (row - m_new).exp();
    rescale[r] = std::exp(m[r] - m_new);
    sum[r] = rescale[r] * sum[r] + row.sum();
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

#pragma once
// Rotary position embeddings (RoPE): queries and keys rotated by their positions.

#include <algorithm>
#include <cmath>

#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

/// Rotary position embeddings (RoPE, Su et al. 2021), a setting of the attention block: each
/// head's query and key at position p have their first `dims` columns rotated in pairs,
///   (x_i, x_{i+dims/2}) ↦ (x_i cos pθ_i − x_{i+dims/2} sin pθ_i,
///                          x_i sin pθ_i + x_{i+dims/2} cos pθ_i),  θ_i = base^(−2i/dims),
/// so that q_m·k_n depends on the positions only through m − n. The pairs are the two halves of
/// the rotated columns (GPT-NeoX's and LLaMA's layout in Hugging Face checkpoints; the original
/// RoFormer pairs neighbours: permute a checkpoint's columns to load one). Positions count from 0
/// at each sequence's first token; a query row i of n_q against n_k keys sits at i + n_k − n_q
/// (the library's alignment, see attention/masking.hpp), and decoding continues from the tokens
/// decoded so far.
struct Rotary {
  bool enabled = false;
  double base = 10000.0;
  Index dims = 0;  ///< leading columns of each head rotated, even; 0: all of d_head

  /// Throws effattn::Error unless the settings fit heads of width d_head (`who` is the block).
  void validate(Index d_head, const char* who) const {
    if (!enabled) return;
    detail::require(base > 0, who, "rotary.base", base, "a base above 0 (10000 in RoPE)");
    const Index d = dims == 0 ? d_head : dims;
    detail::require(d > 0 && d % 2 == 0 && d <= d_head, who, "rotary.dims", d,
                    detail::concat("an even number of columns, at most d_head = ", d_head,
                                   " (0: all of them)"));
  }
};

namespace detail {

/// cos and sin of pθ_i for positions [0, positions()) and i < dims/2, computed in double once
/// and grown by doubling as longer sequences come (before any parallel work).
template <class S>
class RotaryTable {
 public:
  void configure(const Rotary& r, Index d_head) {
    rotary_ = r;
    half_ = r.enabled ? (r.dims == 0 ? d_head : r.dims) / 2 : 0;
    cos_.resize(0, half_);
    sin_.resize(0, half_);
  }
  bool enabled() const { return rotary_.enabled; }
  Index positions() const { return cos_.rows(); }
  std::size_t bytes() const { return sizeof(S) * std::size_t(cos_.size() + sin_.size()); }

  /// Makes positions [0, n) available.
  void reserve(Index n) {
    if (n <= cos_.rows()) return;
    const Index from = cos_.rows(), rows = std::max<Index>({n, 2 * from, 64});
    cos_.conservativeResize(rows, half_);
    sin_.conservativeResize(rows, half_);
    for (Index p = from; p < rows; ++p)
      for (Index i = 0; i < half_; ++i) {
        const double angle =
            double(p) * std::pow(rotary_.base, -2.0 * double(i) / double(2 * half_));
        cos_(p, i) = static_cast<S>(std::cos(angle));
        sin_(p, i) = static_cast<S>(std::sin(angle));
      }
  }

  /// Adds `bias` (if any) to every row of m [rows × heads·d] and rotates each head's leading
  /// 2·half columns: row r is token r % seq of its sequence, at position first + r % seq. One
  /// pass over m, right after the projection that wrote it. `inverse` rotates by −pθ (the
  /// backward: a rotation's transpose is its inverse). reserve(first + seq) must have run.
  void apply(View<S> m, const Matrix<S>& bias, Index heads, Index d, Index seq, Index first,
             bool inverse) const {
    const Index rows = m.rows(), half = half_;
    const S sign = inverse ? S(-1) : S(1);
    parallel_for((rows + 63) / 64, max_threads(), [&](Index task, int) {
      for (Index r = task * 64; r < std::min(rows, task * 64 + 64); ++r) {
        S* x = &m(r, 0);
        if (bias.size() > 0)
          for (Index c = 0; c < m.cols(); ++c)
            x[c] += bias(0, c);
        if (half == 0) continue;
        const Index p = first + r % seq;
        const S* c = &cos_(p, 0);
        const S* s = &sin_(p, 0);
        for (Index h = 0; h < heads; ++h, x += d)
          for (Index i = 0; i < half; ++i) {
            const S a = x[i], b = x[i + half], si = sign * s[i];
            x[i] = a * c[i] - b * si;
            x[i + half] = a * si + b * c[i];
          }
      }
    });
  }

 private:
  Rotary rotary_{};
  Index half_ = 0;
  Matrix<S> cos_, sin_;
};

}  // namespace detail
}  // namespace effattn

#pragma once
// Score modifiers of exact attention: ALiBi's linear biases and logit soft-capping.

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "effattn/core/simd.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

/// ALiBi (Press et al., "Train Short, Test Long"): the scaled logit of query position p and key
/// position j gets −slope_h·|p − j| added, one slope per head, and no positional embedding is
/// needed. `slopes` empty: the paper's geometric default (default_slopes); else one per head.
struct Alibi {
  bool enabled = false;
  std::vector<double> slopes{};

  /// The paper's slopes for h heads: 2^(−8k/h), k = 1 … h, when h is a power of two; otherwise
  /// those of the power of two below it, then every other slope of the power of two above it
  /// (the reference implementation's rule).
  static std::vector<double> default_slopes(Index heads) {
    const auto power_of_two = [](Index n) {
      std::vector<double> s;
      for (Index k = 1; k <= n; ++k)
        s.push_back(std::pow(2.0, -8.0 * double(k) / double(n)));
      return s;
    };
    Index below = 1;
    while (2 * below <= heads)
      below *= 2;
    std::vector<double> s = power_of_two(below);
    const std::vector<double> above = power_of_two(2 * below);
    for (Index k = 0; Index(s.size()) < heads; k += 2)
      s.push_back(above[static_cast<std::size_t>(k)]);
    return s;
  }
};

namespace detail::full {

/// The modifiers of one head: logit → cap·tanh(logit / cap) (when cap > 0), then
/// − slope·|p − j| (when slope > 0), on the scaled logits.
template <class S>
struct ScoreMods {
  S slope = 0;
  S cap = 0;
  bool active() const { return slope != S(0) || cap != S(0); }

  /// Modifies row[0 … n), the logits of the query at position p against the keys at positions
  /// j0 … j0 + n − 1. With `derivative`, stores d(modified)/d(logit) = 1 − tanh² there (1
  /// without a cap), for backward. NaN stays NaN; +∞ is capped to cap.
  void apply(S* row, Index n, Index p, Index j0, S* derivative = nullptr) const {
    Index c = 0;
    if constexpr (std::is_same_v<S, float> && simd::enabled) {
      using simd::Vec;
      constexpr int w = simd::width;
      Vec lane{};
      for (int i = 0; i < w; ++i)
        lane[i] = float(i);
      for (; c + w <= n; c += w) {
        Vec x = simd::load(row + c);
        if (cap != 0.0f) {  // tanh(y) = sign(y)·(1 − e)/(1 + e), e = exp(−2|y|)
          const Vec y = x * (1.0f / cap);
          const Vec a = y < 0.0f ? -y : y;
          const Vec e = simd::exp_nonpositive(-2.0f * a);
          Vec t = (1.0f - e) / (1.0f + e);
          t = y < 0.0f ? -t : t;
          t = y != y ? y : t;  // NaN stays NaN
          if (derivative) simd::store(derivative + c, (1.0f - t) * (1.0f + t));
          x = cap * t;
        } else if (derivative) {
          simd::store(derivative + c, simd::broadcast(1.0f));
        }
        if (slope != 0.0f) {
          const Vec d = lane + float(j0 + c - p);
          x -= slope * (d < 0.0f ? -d : d);
        }
        simd::store(row + c, x);
      }
    }
    for (; c < n; ++c) {
      S x = row[c];
      if (cap != S(0)) {
        const S t = std::tanh(x / cap);
        if (derivative) derivative[c] = (S(1) - t) * (S(1) + t);
        x = cap * t;
      } else if (derivative) {
        derivative[c] = S(1);
      }
      if (slope != S(0)) x -= slope * S(std::abs(j0 + c - p));
      row[c] = x;
    }
  }
};

}  // namespace detail::full
}  // namespace effattn

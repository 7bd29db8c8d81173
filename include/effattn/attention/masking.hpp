#pragma once
// The maskings of an attention block, part of its type: which keys each query row sees.

#include <type_traits>

#include "effattn/core/types.hpp"

namespace effattn {

/// Masking is part of the attention block's type: a policy that cannot attend under a masking
/// does not compile with it (detail::MaskingCheck says why, in one place).
///
/// Query row i (counted from the start of its sequence) sits at key position
/// p = i + n_k − n_q: the last query is aligned with the last key, which is plain
/// self-attention when n_q = n_k and decoding against a cache when n_q < n_k.
/// - Bidirectional: every key (but padding).
/// - Causal: the keys j ≤ p.
/// - CausalWindow<W>: the W keys p − W + 1 … p, itself included (Mistral's sliding window).
/// - SlidingWindow<W>: the W keys p − W/2 … p + (W − 1)/2 around it, itself included
///   (Longformer's local attention; W = 512 sees 256 keys before and 255 after).
/// Windowed kernels skip every key tile outside the window, so the work is n·W, not n².
struct Bidirectional {
  static constexpr bool causal = false;
  static constexpr Index window = 0;  ///< keys a row sees at most; 0: no window
};
struct Causal {
  static constexpr bool causal = true;
  static constexpr Index window = 0;
};
template <Index W>
struct CausalWindow {
  static_assert(W >= 1, "effattn: CausalWindow<W> needs W >= 1 keys (the row itself included).");
  static constexpr bool causal = true;
  static constexpr Index window = W;
};
template <Index W>
struct SlidingWindow {
  static_assert(W >= 1, "effattn: SlidingWindow<W> needs W >= 1 keys (the row itself included).");
  static constexpr bool causal = false;
  static constexpr Index window = W;
};

/// The keys a query row may see, before padding and the key length cut them: keys
/// [p − before, p + after] around its position p (see Bidirectional). Unbounded sides are
/// `none`. AttentionCore hands it to the policy in HeadContext.
struct KeyWindow {
  static constexpr Index none = -1;
  Index before = none;  ///< keys before the row's position it sees; none: all
  Index after = none;   ///< keys after it; none: all (0 when causal)

  template <class Masking>
  static constexpr KeyWindow of() {
    if constexpr (Masking::window > 0) {
      if constexpr (Masking::causal) return {Masking::window - 1, 0};
      return {Masking::window / 2, Masking::window - 1 - Masking::window / 2};
    } else {
      return {none, Masking::causal ? 0 : none};
    }
  }
};

namespace detail {
template <class M>
constexpr bool is_masking = std::is_same_v<M, Bidirectional> || std::is_same_v<M, Causal>;
template <Index W>
constexpr bool is_masking<CausalWindow<W>> = true;
template <Index W>
constexpr bool is_masking<SlidingWindow<W>> = true;

/// True, or a compile error that says what a masking argument must be.
template <class Masking>
constexpr bool assert_masking() {
  static_assert(is_masking<Masking>,
                "effattn: the masking argument must be effattn::Bidirectional, effattn::Causal, "
                "effattn::CausalWindow<W> or effattn::SlidingWindow<W>.");
  return true;
}
}  // namespace detail

}  // namespace effattn

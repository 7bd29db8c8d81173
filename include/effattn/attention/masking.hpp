#pragma once
// The maskings of an attention block, part of its type: which keys each query row sees.

#include <type_traits>

#include "effattn/core/error.hpp"
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
///
/// A window's size is fixed in the type (CausalWindow<512>) or chosen at run time:
/// CausalWindow<> and SlidingWindow<> (W = dynamic_window) hold it as a value,
/// `CausalWindow<>{512}`, which the block takes with its configuration
/// (MultiHeadAttention::Config::masking, or AttentionCore's constructor). Both run the same
/// kernels at the same speed: the window reaches them at run time either way. Every masking
/// states `causal` and `windowed`, and `keys()` gives its KeyWindow.
inline constexpr Index dynamic_window = -1;

/// The keys a query row may see, before padding and the key length cut them: keys
/// [p − before, p + after] around its position p (see Bidirectional). Unbounded sides are
/// `none`. AttentionCore hands it to the policy in HeadContext.
struct KeyWindow {
  static constexpr Index none = -1;
  Index before = none;  ///< keys before the row's position it sees; none: all
  Index after = none;   ///< keys after it; none: all (0 when causal)

  /// The window of `size` keys (at least 1) of a causal or a symmetric window.
  static constexpr KeyWindow of_size(Index size, bool causal) {
    if (causal) return {size - 1, 0};
    return {size / 2, size - 1 - size / 2};
  }
};

struct Bidirectional {
  static constexpr bool causal = false;
  static constexpr bool windowed = false;
  static constexpr KeyWindow keys() { return {}; }
};
struct Causal {
  static constexpr bool causal = true;
  static constexpr bool windowed = false;
  static constexpr KeyWindow keys() { return {KeyWindow::none, 0}; }
};

namespace detail {
/// What the two windows share: a window of W keys, causal or around the row; its size in the
/// type or, for W = dynamic_window, a value.
template <bool Causal, Index W>
struct WindowOf {
  static constexpr bool causal = Causal;
  static constexpr bool windowed = true;
  static constexpr Index size = W;  ///< keys a row sees, itself included
  static constexpr KeyWindow keys() { return KeyWindow::of_size(W, Causal); }
};
template <bool Causal>
struct WindowOf<Causal, dynamic_window> {
  static constexpr bool causal = Causal;
  static constexpr bool windowed = true;
  Index size = 0;  ///< keys a row sees, itself included (at least 1: the block checks)
  constexpr KeyWindow keys() const { return KeyWindow::of_size(size, Causal); }
};
}  // namespace detail

template <Index W = dynamic_window>
struct CausalWindow : detail::WindowOf<true, W> {
  static_assert(W >= 1 || W == dynamic_window,
                "effattn: CausalWindow<W> needs W >= 1 keys (the row itself included); "
                "CausalWindow<> takes its size at run time.");
};
template <Index W = dynamic_window>
struct SlidingWindow : detail::WindowOf<false, W> {
  static_assert(W >= 1 || W == dynamic_window,
                "effattn: SlidingWindow<W> needs W >= 1 keys (the row itself included); "
                "SlidingWindow<> takes its size at run time.");
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

/// Throws effattn::Error unless a masking's window holds at least one key (a run-time size).
template <class Masking>
void check_masking(const Masking& masking, const char* who) {
  if constexpr (Masking::windowed)
    require(masking.size >= 1, who, "masking.size", concat("a window of ", masking.size, " keys"),
            "at least 1 key (the row itself), e.g. CausalWindow<>{512}");
}
}  // namespace detail

}  // namespace effattn

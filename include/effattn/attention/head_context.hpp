#pragma once
// HeadContext: what an attention policy is told about the one head of one sequence it computes.

#include <algorithm>

#include "effattn/attention/masking.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

/// One (sequence, head) problem: `q` holds query rows query_offset … of the sequence
/// (a slice when the block splits a head's queries across threads), `k`/`v` the whole key
/// sequence. Keys at or beyond `key_length` are padding. Query i (counted from the start of
/// the sequence) sits at key position p = i + causal_shift, with causal_shift = n_k − n_q: the
/// last query is aligned with the last key, which is plain self-attention when n_q = n_k and
/// decoding against a cache when n_q < n_k. When `causal` it sees key j iff j ≤ p; a `window`
/// (the masking's, attention/masking.hpp) bounds that further to [p − before, p + after].
struct HeadContext {
  Index sequence = 0;
  Index head = 0;
  Index query_offset = 0;
  Index key_length = 0;
  Index causal_shift = 0;
  bool causal = false;
  /// Threads the call has for each (sequence, head) (AttentionCore: threads / problems, at least
  /// 1). A policy may split a head into more blocks when it is 2 or more, where the split costs
  /// work a single thread would not do, provided the bits stay the same (Favor's causal blocks).
  Index spread = 1;
  /// The keys around its position a row sees (none: unbounded); a policy that is not told of
  /// windows never gets one (MaskingCheck).
  KeyWindow window{};

  /// Key position of query row `i` (slice-relative).
  Index position(Index i) const { return query_offset + i + causal_shift; }

  /// Keys query row `i` (slice-relative) may see: [key_begin(i), key_end(i)). Both grow with i.
  Index key_end(Index i) const {
    Index last = key_length;
    if (causal)
      last = position(i) + 1;
    else if (window.after != KeyWindow::none)
      last = position(i) + window.after + 1;
    return std::clamp<Index>(last, 0, key_length);
  }
  Index key_begin(Index i) const {
    if (window.before == KeyWindow::none) return 0;
    return std::clamp<Index>(position(i) - window.before, 0, key_end(i));
  }
  /// The columns [from, to) of the key tile [j0, j0 + cols) that row `i` sees.
  struct Columns {
    Index from, to;
  };
  Columns columns_seen(Index i, Index j0, Index cols) const {
    const Index to = std::clamp<Index>(key_end(i) - j0, 0, cols);
    return {std::clamp<Index>(key_begin(i) - j0, 0, to), to};
  }
  /// Whether some row may miss keys at the start of the sequence (a window).
  bool windowed() const { return window.before != KeyWindow::none; }
};

}  // namespace effattn

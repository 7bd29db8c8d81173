#pragma once
// HeadContext: what an attention policy is told about the one head of one sequence it computes.

#include "effattn/core/types.hpp"

namespace effattn {

/// One (sequence, head) problem: `q` holds query rows query_offset … of the sequence
/// (a slice when the block splits a head's queries across threads), `k`/`v` the whole key
/// sequence. Keys at or beyond `key_length` are padding. When `causal`, query i (counted
/// from the start of the sequence) sees key j iff j ≤ i + causal_shift, with
/// causal_shift = n_k − n_q: the last query is aligned with the last key, which is plain
/// causal self-attention when n_q = n_k and decoding against a cache when n_q < n_k.
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

  /// Keys query row `i` (slice-relative) may see: [0, key_end(i)).
  Index key_end(Index i) const {
    if (!causal) return key_length;
    const Index last = query_offset + i + causal_shift + 1;
    return last < key_length ? (last > 0 ? last : 0) : key_length;
  }
};

}  // namespace effattn

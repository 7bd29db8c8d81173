#pragma once
// HeadLayout: how the multi-head block lays out its heads, as a policy is told at construction.

#include <cstdint>

#include "effattn/core/types.hpp"

namespace effattn {

/// How the multi-head block lays out heads; a policy that owns per-head parameters
/// (random features, projections) sizes them from this.
///
/// Grouped-query attention (GQA; MQA when kv_heads = 1): `kv_heads` key/value heads, a divisor
/// of `heads`, each shared by group() = heads / kv_heads consecutive query heads (query head h
/// reads key/value head h / group()). Keys and values are then [rows × kv_heads·d]. A policy
/// computes one query head at a time as before, told its query head in HeadContext::head.
struct HeadLayout {
  Index heads = 1;
  Index d_key = 1;    ///< width of a query/key head
  Index d_value = 1;  ///< width of a value/output head
  std::uint64_t seed = 0;
  Index kv_heads = 0;  ///< key/value heads (GQA), a divisor of heads; 0: heads

  /// Key/value heads in effect.
  Index kv() const { return kv_heads == 0 ? heads : kv_heads; }
  /// Query heads per key/value head.
  Index group() const { return heads / kv(); }
};

}  // namespace effattn

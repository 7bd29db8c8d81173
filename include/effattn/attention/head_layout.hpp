#pragma once
// HeadLayout: how the multi-head block lays out its heads, as a policy is told at construction.

#include <cstdint>

#include "effattn/core/types.hpp"

namespace effattn {

/// How the multi-head block lays out heads; a policy that owns per-head parameters
/// (random features, projections) sizes them from this.
struct HeadLayout {
  Index heads = 1;
  Index d_key = 1;    ///< width of a query/key head
  Index d_value = 1;  ///< width of a value/output head
  std::uint64_t seed = 0;
};

}  // namespace effattn

#pragma once
// Sorting tokens by (bucket, position) for LSH attention: a stable counting sort.

#include <algorithm>
#include <cstdint>

#include "effattn/core/types.hpp"

namespace effattn::detail::lsh {

/// Puts the padded tokens [length, n) in the extra last bucket `buckets`, then writes to
/// `order` the n tokens sorted by (bucket, position): a counting sort, stable because it
/// visits positions in ascending order. `count` is scratch of buckets + 2 entries.
inline void sort_by_bucket(std::int32_t* bucket, Index n, Index length, Index buckets,
                           std::int32_t* order, Index* count) {
  std::fill(bucket + length, bucket + n, static_cast<std::int32_t>(buckets));
  std::fill(count, count + buckets + 2, Index(0));
  for (Index t = 0; t < n; ++t)
    ++count[bucket[t] + 1];
  for (Index i = 1; i < buckets + 2; ++i)
    count[i] += count[i - 1];
  for (Index t = 0; t < n; ++t)
    order[count[bucket[t]]++] = static_cast<std::int32_t>(t);
}

}  // namespace effattn::detail::lsh

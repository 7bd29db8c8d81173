#pragma once
// distributed_sort: each token's index in the (bucket, position) order of a whole sequence, by
// a counting sort shared among the ranks (mpi::ShardedLSH).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"
#include "effattn/mpi/communicator.hpp"

namespace effattn::mpi::detail {

/// Sorts several independent sequences ("tasks": one per sequence, head and hash round) whose
/// tokens are spread over the ranks. This rank's tokens of task t are the pairs
/// (bucket[t][i], position[t][i]); start(t, b) is bucket b's first sorted index in task t
/// (known to every rank from the summed bucket counts). Bucket b of `buckets` is sorted by rank
/// ⌊b·P / buckets⌋: each token's pair goes there (one all-to-all of 8 bytes per token), which
/// orders its buckets' tokens by position and returns each its index (4 bytes per token).
/// Returns, per task, the sorted index of each of this rank's tokens, in its order. Adds the
/// bytes sent to other ranks to `bytes`.
template <class Start>
std::vector<std::vector<std::int32_t>> distributed_sort(
    const Communicator& comm, const std::vector<std::vector<std::int32_t>>& bucket,
    const std::vector<std::vector<std::int32_t>>& position, Index buckets, Start&& start,
    int threads, std::size_t& bytes) {
  const std::size_t P = std::size_t(comm.size()), T = bucket.size();
  auto rank_of = [&](std::int32_t b) { return std::size_t(Index(b) * Index(P) / buckets); };
  // How many pairs go to each rank per task, and where each block starts.
  std::vector<std::int64_t> want(P * T, 0), got(P * T);
  for (std::size_t t = 0; t < T; ++t)
    for (const std::int32_t b : bucket[t])
      ++want[rank_of(b) * T + t];
  comm.all_to_all(want.data(), std::vector<std::size_t>(P, T), got.data(),
                  std::vector<std::size_t>(P, T));
  std::vector<std::size_t> at(P * T), in_at(P * T), to(P, 0), from(P, 0);
  std::size_t total = 0, in_total = 0;
  for (std::size_t i = 0; i < P * T; ++i) {
    at[i] = total;
    in_at[i] = in_total;
    total += std::size_t(want[i]);
    in_total += std::size_t(got[i]);
    to[i / T] += std::size_t(want[i]);
    from[i / T] += std::size_t(got[i]);
  }
  // The pairs, by rank then task, each task's in this rank's order.
  std::vector<std::int32_t> pairs(2 * total), incoming(2 * in_total);
  std::vector<std::size_t> cursor = at;
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t i = 0; i < bucket[t].size(); ++i) {
      const std::size_t c = cursor[rank_of(bucket[t][i]) * T + t]++;
      pairs[2 * c] = bucket[t][i];
      pairs[2 * c + 1] = position[t][i];
    }
  std::vector<std::size_t> to2(P), from2(P);
  for (std::size_t r = 0; r < P; ++r) {
    to2[r] = 2 * to[r];
    from2[r] = 2 * from[r];
    if (int(r) != comm.rank()) bytes += sizeof(std::int32_t) * (to2[r] + to[r]);
  }
  comm.all_to_all(pairs.data(), to2, incoming.data(), from2);

  // This rank's buckets: each task's pairs by (bucket, position), numbered from the bucket's
  // start.
  std::vector<std::int32_t> reply(in_total);
  parallel_for(Index(T), threads, [&](Index task, int) {
    const std::size_t t = std::size_t(task);
    std::vector<std::pair<std::int64_t, std::size_t>> keys;  // (bucket·2^32 + position, entry)
    for (std::size_t r = 0; r < P; ++r)
      for (std::size_t e = in_at[r * T + t]; e < in_at[r * T + t] + std::size_t(got[r * T + t]);
           ++e)
        keys.emplace_back(
            std::int64_t(incoming[2 * e]) * (std::int64_t(1) << 32) + incoming[2 * e + 1], e);
    std::sort(keys.begin(), keys.end());
    std::int64_t current = -1, next = 0;
    for (const auto& [key, entry] : keys) {
      const std::int64_t b = key >> 32;
      if (b != current) next = start(task, current = b);
      reply[entry] = static_cast<std::int32_t>(next++);
    }
  });
  std::vector<std::int32_t> sorted(total);
  comm.all_to_all(reply.data(), from, sorted.data(), to);
  std::vector<std::vector<std::int32_t>> result(T);
  cursor = at;
  for (std::size_t t = 0; t < T; ++t) {
    result[t].resize(bucket[t].size());
    for (std::size_t i = 0; i < bucket[t].size(); ++i)
      result[t][i] = sorted[cursor[rank_of(bucket[t][i]) * T + t]++];
  }
  return result;
}

}  // namespace effattn::mpi::detail

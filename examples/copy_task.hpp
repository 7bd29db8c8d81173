#pragma once
// The copy task of training_loop and convert_to_performer: the Reformer paper's duplication
// task in miniature.

#include <effattn/effattn.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

// Sequences 0 w 0 w (w: `half` − 1 symbols from 1 … vocab − 1) of batch `index` (every index a
// fresh batch); targets are the next tokens, counted on the second copy of w only (−100
// elsewhere, as PyTorch's ignore_index).
inline void make_batch(std::int64_t index, effattn::Index batch, effattn::Index half,
                       effattn::Index vocab, std::vector<std::int32_t>& ids,
                       std::vector<std::int32_t>& targets) {
  using effattn::Index;
  const Index seq = 2 * half;
  ids.assign(std::size_t(batch * seq), 0);
  targets.assign(ids.size(), -100);
  effattn::Matrix<float> u(batch, half);
  effattn::CounterRng(7, std::uint64_t(index)).fill_uniform(u, 0.0, 1.0);
  for (Index b = 0; b < batch; ++b) {
    for (Index i = 1; i < half; ++i) {
      const auto w = std::int32_t(1 + Index(u(b, i) * float(vocab - 1)) % (vocab - 1));
      ids[std::size_t(b * seq + i)] = ids[std::size_t(b * seq + half + i)] = w;
    }
    for (Index t = half; t + 1 < seq; ++t)  // predicting w's second copy from its first
      targets[std::size_t(b * seq + t)] = ids[std::size_t(b * seq + t + 1)];
  }
}

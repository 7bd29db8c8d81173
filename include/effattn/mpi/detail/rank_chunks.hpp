#pragma once
// RoundPlan and RankChunks: where an LSH round's chunks lie in the sorted order of a whole
// sequence, and the chunks one rank computes, over the tokens it was sent (mpi::ShardedLSH).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "effattn/attention/lsh/chunks.hpp"
#include "effattn/attention/lsh/lsh_config.hpp"
#include "effattn/core/types.hpp"

namespace effattn::mpi::detail {

/// One hash round of a whole sequence of `valid` tokens sorted by (bucket, position), from its
/// bucket counts: bucket b holds sorted indices [start[b], start[b + 1]). Chunks are `chunk`
/// sorted tokens; causal chunks also end at bucket ends (as LSHAttention cuts them), bucket b
/// holding chunks [first_chunk[b], first_chunk[b + 1]).
struct RoundPlan {
  bool causal = false;
  Index chunk = 1, valid = 0, chunks = 0;
  std::vector<std::int64_t> start, first_chunk;

  RoundPlan() = default;
  RoundPlan(const std::int32_t* counts, Index buckets, Index chunk_, Index valid_, bool causal_)
      : causal(causal_), chunk(chunk_), valid(valid_), start(std::size_t(buckets) + 1, 0) {
    for (Index b = 0; b < buckets; ++b)
      start[std::size_t(b) + 1] = start[std::size_t(b)] + counts[b];
    if (causal) {
      first_chunk.assign(std::size_t(buckets) + 1, 0);
      for (Index b = 0; b < buckets; ++b)
        first_chunk[std::size_t(b) + 1] =
            first_chunk[std::size_t(b)] + (counts[b] + chunk - 1) / chunk;
      chunks = first_chunk.back();
    } else {
      chunks = (valid + chunk - 1) / chunk;
    }
  }
  /// The chunk of sorted index s (in bucket b).
  Index chunk_of(Index s, Index b) const {
    return causal ? first_chunk[std::size_t(b)] + (s - start[std::size_t(b)]) / chunk : s / chunk;
  }
  /// The first sorted index of chunk ci (in bucket b).
  Index first(Index ci, Index b) const {
    return causal ? start[std::size_t(b)] + (ci - first_chunk[std::size_t(b)]) * chunk : ci * chunk;
  }
  /// Calls f(cj) for every chunk whose window holds chunk ci (in bucket b), each once.
  template <class F>
  void for_each_seeing(const LSHConfig& cfg, Index ci, Index b, F&& f) const {
    around(ci, b, cfg.look_forward, cfg.look_back, f);
  }
  /// Calls f(cj) for every chunk in the window of chunk ci (in bucket b), in the order
  /// LSHAttention gathers them.
  template <class F>
  void for_each_seen(const LSHConfig& cfg, Index ci, Index b, F&& f) const {
    around(ci, b, cfg.look_back, cfg.look_forward, f);
  }

 private:
  // Chunks ci − before … ci + after in order: within bucket b when causal, else around the
  // round (every chunk once when they are fewer).
  template <class F>
  void around(Index ci, Index b, Index before, Index after, F& f) const {
    if (causal) {
      const Index lo = std::max<Index>(first_chunk[std::size_t(b)], ci - before);
      const Index hi = std::min<Index>(first_chunk[std::size_t(b) + 1] - 1, ci + after);
      for (Index cj = lo; cj <= hi; ++cj)
        f(cj);
    } else if (before + 1 + after >= chunks) {
      for (Index cj = 0; cj < chunks; ++cj)
        f(cj);
    } else {
      for (Index o = -before; o <= after; ++o)
        f(((ci + o) % chunks + chunks) % chunks);
    }
  }
};

/// The chunks of every round that one rank computes and those their windows reach, over the
/// tokens it was sent, with the interface of detail::lsh::Chunking that LSHAttention's chunk
/// loops use. Tokens are local ids 0 … tokens − 1 in position order (so that comparing ids
/// compares positions, as the causal mask does); `owned(ci)` tells this rank's own chunks.
class RankChunks {
 public:
  RankChunks() = default;
  /// From the tokens' sorted index and bucket in every round (rounds × tokens each), the
  /// rounds' plans, and owner(round, ci), the rank that computes a chunk.
  template <class Owner>
  RankChunks(const LSHConfig& config, bool causal, std::vector<RoundPlan> plans, Index tokens,
             const std::vector<std::int32_t>& sorted, std::vector<std::int32_t> buckets, int me,
             Owner&& owner)
      : config_(config),
        plans_(std::move(plans)),
        causal_(causal),
        tokens_(tokens),
        rounds_(Index(plans_.size())),
        bucket_(std::move(buckets)),
        chunk_(sorted.size()),
        order_(sorted.size()),
        round_start_(plans_.size() + 1, 0) {
    for (Index round = 0; round < rounds_; ++round) {
      const RoundPlan& plan = plans_[std::size_t(round)];
      if (round == 0) global_chunks_ = plan.chunks;
      const std::size_t at = std::size_t(round * tokens_);
      auto mine = [&](Index ci, Index b) { return owner(round, plan.first(ci, b)) == me; };
      // The round's tokens whose chunk a chunk of this rank sees, in sorted order.
      std::vector<std::pair<std::int32_t, std::int32_t>> here;  // (sorted index, id)
      for (Index t = 0; t < tokens_; ++t) {
        const Index b = bucket_[at + std::size_t(t)], s = sorted[at + std::size_t(t)];
        const Index ci = plan.chunk_of(s, b);
        chunk_[at + std::size_t(t)] = std::int32_t(ci);
        bool needed = false;
        plan.for_each_seeing(config_, ci, b, [&](Index cj) { needed = needed || mine(cj, b); });
        if (needed) here.emplace_back(std::int32_t(s), std::int32_t(t));
      }
      std::sort(here.begin(), here.end());
      const std::size_t first = std::size_t(round_start_[std::size_t(round)]);
      for (std::size_t i = 0; i < here.size(); ++i) {
        const std::int32_t t = here[i].second;
        order_[first + i] = t;
        const Index ci = chunk_[at + std::size_t(t)];
        if (i == 0 || ci != chunk_[at + std::size_t(order_[first + i - 1])])
          chunks_.push_back({round, ci, Index(i), mine(ci, bucket_[at + std::size_t(t)])});
      }
      round_start_[std::size_t(round) + 1] = round_start_[std::size_t(round)] + Index(here.size());
      chunk_begin_.push_back(Index(chunks_.size()));
    }
  }

  /// Round `round`'s chunks become chunks 0 … chunks() − 1.
  void select(Index round) {
    round_ = round;
    const Index at = round_start_[std::size_t(round)];
    order = order_.data() + at;
    bucket = bucket_.data() + std::size_t(round * tokens_);
    first_ = round == 0 ? 0 : chunk_begin_[std::size_t(round) - 1];
    count_ = chunk_begin_[std::size_t(round)] - first_;
    length_ = round_start_[std::size_t(round) + 1] - at;
  }
  Index chunks() const { return count_; }
  Index first(Index ci) const { return piece(ci).first; }
  Index stop(Index ci) const { return ci + 1 < count_ ? piece(ci + 1).first : length_; }
  bool causal() const { return causal_; }
  bool dedup() const { return config_.dedup; }
  /// Whether this rank computes chunk ci.
  bool owned(Index ci) const { return piece(ci).owned; }

  template <class F>
  void for_each_window_chunk(Index ci, F&& f) const {
    const Piece& c = piece(ci);
    const RoundPlan& plan = plans_[std::size_t(round_)];
    const Index b = bucket[order[c.first]];
    plan.for_each_seen(config_, c.global, b, [&](Index cj) {
      const Index local = find(cj);
      if (local >= 0) f(first(local), stop(local));
    });
  }

  /// Rounds in which query i may attend to key j (dedup), as Chunking::shared_rounds.
  Index shared_rounds(Index i, Index j) const {
    const LSHConfig& cfg = config_;
    Index count = 0;
    for (Index round = 0; round < rounds_; ++round) {
      const std::size_t at = std::size_t(round * tokens_);
      if ((cfg.same_bucket || causal_) &&
          bucket_[at + std::size_t(i)] != bucket_[at + std::size_t(j)])
        continue;
      count += effattn::detail::lsh::window_sees(
          cfg, causal_, chunk_[at + std::size_t(j)] - chunk_[at + std::size_t(i)], global_chunks_);
    }
    return count;
  }

  const std::int32_t* order = nullptr;   // this round: local ids in sorted order
  const std::int32_t* bucket = nullptr;  // this round: bucket of each local id

  std::size_t bytes() const {
    std::size_t bytes = sizeof(std::int32_t) * (bucket_.size() + chunk_.size() + order_.size()) +
                        sizeof(Piece) * chunks_.size();
    for (const RoundPlan& p : plans_)
      bytes += sizeof(std::int64_t) * (p.start.size() + p.first_chunk.size());
    return bytes;
  }

 private:
  struct Piece {
    Index round, global, first;
    bool owned;
  };
  const Piece& piece(Index ci) const { return chunks_[std::size_t(first_ + ci)]; }
  // The local index of global chunk cj of this round, or −1.
  Index find(Index cj) const {
    const auto begin = chunks_.begin() + first_, end = begin + count_;
    const auto it =
        std::lower_bound(begin, end, cj, [](const Piece& p, Index g) { return p.global < g; });
    return it != end && it->global == cj ? Index(it - begin) : -1;
  }

  LSHConfig config_{};
  std::vector<RoundPlan> plans_;
  bool causal_ = false;
  Index tokens_ = 0, rounds_ = 0, global_chunks_ = 0;
  std::vector<std::int32_t> bucket_, chunk_, order_;  // rounds × tokens
  std::vector<Index> round_start_, chunk_begin_;
  std::vector<Piece> chunks_;
  Index round_ = 0, first_ = 0, count_ = 0, length_ = 0;
};

/// The rank that computes the chunk starting at sorted index s of a round of `valid` tokens
/// (each rank an equal share of the sorted order).
inline int chunk_rank(Index s, Index valid, int ranks) {
  return int(s * ranks / valid);
}

/// The ranks each of this rank's `rows` rows must go to, each once: those computing a chunk
/// whose window holds the row in some round. `sorted` (−1: padding) and `bucket` are rounds ×
/// rows; `sent` receives the rows for each rank in rank order (ascending), `count` how many.
inline void destinations(const LSHConfig& cfg, const std::vector<RoundPlan>& plans,
                         const std::vector<std::int32_t>& sorted,
                         const std::vector<std::int32_t>& bucket, Index rows, Index valid,
                         int ranks, std::vector<std::int32_t>& sent,
                         std::vector<std::size_t>& count) {
  std::vector<std::vector<std::int32_t>> to(static_cast<std::size_t>(ranks));
  std::vector<int> dests;
  for (Index row = 0; row < rows; ++row) {
    if (sorted[std::size_t(row)] < 0) continue;  // padding
    dests.clear();
    for (std::size_t round = 0; round < plans.size(); ++round) {
      const RoundPlan& plan = plans[round];
      const Index s = sorted[round * std::size_t(rows) + std::size_t(row)];
      const Index b = bucket[round * std::size_t(rows) + std::size_t(row)];
      plan.for_each_seeing(cfg, plan.chunk_of(s, b), b, [&](Index cj) {
        dests.push_back(chunk_rank(plan.first(cj, b), valid, ranks));
      });
    }
    std::sort(dests.begin(), dests.end());
    dests.erase(std::unique(dests.begin(), dests.end()), dests.end());
    for (const int d : dests)
      to[std::size_t(d)].push_back(static_cast<std::int32_t>(row));
  }
  sent.clear();
  count.assign(to.size(), 0);
  for (std::size_t d = 0; d < to.size(); ++d) {
    sent.insert(sent.end(), to[d].begin(), to[d].end());
    count[d] = to[d].size();
  }
}

/// Local ids of one problem's fetched tokens: `tokens` holds (position, fetched row) and is
/// sorted by position, id i being its i-th; `meta` holds each fetched row's position, then
/// its sorted index and bucket per round. Fills row_of (id → fetched row), and sorted and
/// bucket (rounds × ids).
inline void number_tokens(std::vector<std::pair<std::int32_t, std::int32_t>>& tokens,
                          const std::int32_t* meta, Index rounds, std::vector<std::int32_t>& row_of,
                          std::vector<std::int32_t>& sorted, std::vector<std::int32_t>& bucket) {
  std::sort(tokens.begin(), tokens.end());
  const Index L = Index(tokens.size()), width = 1 + 2 * rounds;
  sorted.resize(std::size_t(rounds * L));
  bucket.resize(std::size_t(rounds * L));
  row_of.resize(std::size_t(L));
  for (Index id = 0; id < L; ++id) {
    const Index row = tokens[std::size_t(id)].second;
    row_of[std::size_t(id)] = static_cast<std::int32_t>(row);
    for (Index round = 0; round < rounds; ++round) {
      sorted[std::size_t(round * L + id)] = meta[row * width + 1 + 2 * round];
      bucket[std::size_t(round * L + id)] = meta[row * width + 2 + 2 * round];
    }
  }
}

}  // namespace effattn::mpi::detail

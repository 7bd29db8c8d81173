#pragma once
// SequenceShards: which positions of every sequence each rank holds.

#include <algorithm>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"
#include "effattn/mpi/communicator.hpp"

namespace effattn::mpi {

/// Positions [offset, offset + length) of a sequence.
struct Segment {
  Index offset = 0;
  Index length = 0;
};

/// Which positions of each sequence every rank holds: rank r's local rows of a sequence are
/// its segments one after another, in the order listed. Every sequence of a batch is sharded
/// alike, so a rank's activations are [batch · local_length(r) × d], sequence b at rows
/// b · local_length(r) … (the library's layout, on the local rows). Together the segments of
/// all ranks cover [0, total) once; every rank holds at least one position.
class SequenceShards {
 public:
  /// From each rank's segments (all ranks must pass the same), checked to cover [0, total)
  /// exactly once.
  explicit SequenceShards(std::vector<std::vector<Segment>> per_rank)
      : per_rank_(std::move(per_rank)) {
    constexpr const char* who = "mpi::SequenceShards";
    effattn::detail::require(!per_rank_.empty(), who, "per_rank", "empty", "one list per rank");
    std::vector<Segment> all;
    for (std::size_t r = 0; r < per_rank_.size(); ++r) {
      Index local = 0;
      for (const Segment& s : per_rank_[r]) {
        effattn::detail::require(s.offset >= 0 && s.length > 0, who,
                                 effattn::detail::concat("segment of rank ", r),
                                 effattn::detail::concat("[", s.offset, ", +", s.length, ")"),
                                 "an offset ≥ 0 and a length ≥ 1");
        local += s.length;
        all.push_back(s);
      }
      effattn::detail::require(local > 0, who, effattn::detail::concat("rank ", r), "no position",
                               "at least one position per rank");
    }
    std::sort(all.begin(), all.end(),
              [](const Segment& a, const Segment& b) { return a.offset < b.offset; });
    for (const Segment& s : all) {
      effattn::detail::require(
          s.offset == total_, who, "segments",
          effattn::detail::concat("a segment at ", s.offset, " after ", total_, " positions"),
          "segments that cover [0, total) once, without gap or overlap");
      total_ += s.length;
    }
  }

  /// Rank r holds `local_length` consecutive positions, after those of ranks 0 … r − 1
  /// (lengths may differ between ranks). Collective: every rank calls it.
  static SequenceShards contiguous(const Communicator& comm, Index local_length) {
    const std::vector<std::int64_t> lengths = comm.all_gather(local_length);
    std::vector<std::vector<Segment>> per_rank;
    Index offset = 0;
    for (const std::int64_t n : lengths) {
      effattn::detail::require(n > 0, "mpi::SequenceShards", "local_length",
                               effattn::detail::concat(n, " on rank ", per_rank.size()),
                               "at least one position on every rank");
      per_rank.push_back({Segment{offset, Index(n)}});
      offset += Index(n);
    }
    return SequenceShards(std::move(per_rank));
  }

  /// Causal load balance: the sequence cut into 2P chunks as equal as can be, rank r holding
  /// chunks r and 2P − 1 − r, so that every rank has about the same share of the causal
  /// triangle. Needs total ≥ 2P; no communication.
  static SequenceShards balanced(int ranks, Index total) {
    effattn::detail::require(
        ranks > 0 && total >= 2 * Index(ranks), "mpi::SequenceShards", "total", total,
        effattn::detail::concat("at least 2 positions per rank (", 2 * Index(ranks), ")"));
    const Index chunks = 2 * Index(ranks);
    auto chunk = [&](Index c) {
      const Index begin = c * total / chunks, end = (c + 1) * total / chunks;
      return Segment{begin, end - begin};
    };
    std::vector<std::vector<Segment>> per_rank;
    for (Index r = 0; r < ranks; ++r)
      per_rank.push_back({chunk(r), chunk(chunks - 1 - r)});
    return SequenceShards(std::move(per_rank));
  }

  /// Whether every rank holds one segment and the ranks' segments follow in rank order
  /// (what contiguous() makes): what a prefix scan over the ranks needs.
  bool in_rank_order() const {
    Index next = 0;
    for (const std::vector<Segment>& segments : per_rank_) {
      if (segments.size() != 1 || segments[0].offset != next) return false;
      next += segments[0].length;
    }
    return true;
  }
  int ranks() const { return static_cast<int>(per_rank_.size()); }
  /// Positions per sequence, over all ranks.
  Index total() const { return total_; }
  const std::vector<Segment>& segments(int rank) const {
    return per_rank_[static_cast<std::size_t>(rank)];
  }
  /// Rows per sequence on `rank`.
  Index local_length(int rank) const {
    Index n = 0;
    for (const Segment& s : segments(rank))
      n += s.length;
    return n;
  }
  Index longest_local_length() const {
    Index n = 0;
    for (int r = 0; r < ranks(); ++r)
      n = std::max(n, local_length(r));
    return n;
  }
  Index longest_segment() const {
    Index n = 0;
    for (const auto& list : per_rank_)
      for (const Segment& s : list)
        n = std::max(n, s.length);
    return n;
  }

 private:
  std::vector<std::vector<Segment>> per_rank_;
  Index total_ = 0;
};

}  // namespace effattn::mpi

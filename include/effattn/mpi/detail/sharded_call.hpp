#pragma once
// ShardedCall: the checks every sequence-parallel attention makes on a call, agreed by all ranks.

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/core/aliasing.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/mpi/communicator.hpp"
#include "effattn/mpi/detail/fingerprint.hpp"
#include "effattn/mpi/sequence_shards.hpp"

namespace effattn::mpi::detail {

/// The maskings sequence parallelism runs: Bidirectional or Causal (not yet a window).
template <class Masking>
constexpr bool assert_sharded_masking() {
  static_assert(effattn::detail::assert_masking<Masking>());
  static_assert(!Masking::windowed,
                "effattn: sequence parallelism (mpi::) does not run windowed masking "
                "(CausalWindow<W>, SlidingWindow<W>) yet; use Bidirectional or Causal, or run the "
                "windowed block without mpi::SequenceParallel.");
  return true;
}

/// What a sequence-parallel attention (`who`) knows of its call: the ranks, the shards and the
/// heads, and the checks of a call that every rank must pass before any data moves.
class ShardedCall {
 public:
  ShardedCall(const char* who, HeadLayout layout, Communicator comm, SequenceShards shards)
      : who_(who), layout_(layout), comm_(comm), shards_(std::move(shards)) {
    effattn::detail::require(shards_.ranks() == comm_.size(), who_, "shards",
                             effattn::detail::concat("shards for ", shards_.ranks(), " ranks"),
                             effattn::detail::concat("one shard per rank (", comm_.size(), ")"));
    effattn::detail::require(
        layout_.kv() == layout_.heads, who_, "kv_heads", layout_.kv_heads,
        effattn::detail::concat("0 or heads = ", layout_.heads,
                                ": grouped key/value heads (GQA) are not sequence-parallel yet; "
                                "run a GQA block without mpi::SequenceParallel"));
    Fingerprint f;
    f.add(layout_.heads).add(layout_.d_key).add(layout_.d_value).add(layout_.seed);
    for (int r = 0; r < shards_.ranks(); ++r) {
      f.add(r);
      for (const Segment& s : shards_.segments(r))
        f.add(s.offset).add(s.length);
    }
    own_fingerprint_ = f.value();
  }

  const char* who() const { return who_; }
  const HeadLayout& layout() const { return layout_; }
  const Communicator& comm() const { return comm_; }
  const SequenceShards& shards() const { return shards_; }
  /// Rows per sequence on this rank.
  Index local_length() const { return shards_.local_length(comm_.rank()); }

  /// Runs the checks and compares the ranks' configurations (the head layout and shard table,
  /// and `more` named parts); if any rank's checks fail, every rank throws (the others with
  /// "rejected on another rank"), and if any part differs between ranks, every rank throws
  /// naming it: before any data moves, in one all-reduce.
  static constexpr std::size_t max_parts = 4;
  template <class Checks>
  void agree(Checks&& checks, std::span<const NamedFingerprint> more = {}) const {
    // v[0]: a rank failed; then each part's fingerprint f and −f: their maxima over the ranks
    // are f and −f only if every rank has f.
    std::array<std::int64_t, 1 + 2 * (1 + max_parts)> v{};
    const std::size_t parts = 1 + std::min(more.size(), max_parts), count = 1 + 2 * parts;
    for (std::size_t i = 0; i < parts; ++i) {
      v[1 + 2 * i] = i == 0 ? own_fingerprint_ : more[i - 1].value;
      v[2 + 2 * i] = -v[1 + 2 * i];
    }
    try {
      checks();
    } catch (const Error&) {
      v[0] = 1;
      comm_.all_reduce(v.data(), count, true);
      throw;
    }
    comm_.all_reduce(v.data(), count, true);
    effattn::detail::require(v[0] == 0, who_, "call", "rejected on another rank",
                             "the same valid call on every rank");
    for (std::size_t i = 0; i < parts; ++i)
      effattn::detail::require(
          v[1 + 2 * i] == -v[2 + 2 * i], who_, i == 0 ? "head layout and shards" : more[i - 1].name,
          "not the same on every rank",
          "one configuration on every rank (the same block built with the same d_model, heads, "
          "seed, policy settings, random features and SequenceShards)");
  }

  /// Valid positions of each whole sequence: the sum over ranks of their valid rows. Every
  /// rank must pass the same batch, and its count must be the one that length implies
  /// (padding at the end of the whole sequence).
  std::vector<Index> whole_lengths(const SequenceShape& shape) const {
    std::int64_t batch[2] = {shape.batch, -std::int64_t(shape.batch)};
    comm_.all_reduce(batch, 2, true);
    effattn::detail::require(batch[0] == -batch[1], who_, "shape.batch",
                             "not the same on every rank", "one batch size on every rank");
    std::vector<std::int64_t> sums(std::size_t(shape.batch));
    for (Index b = 0; b < shape.batch; ++b)
      sums[std::size_t(b)] = shape.valid_length(b);
    comm_.all_reduce(sums.data(), sums.size());
    std::vector<Index> valid(sums.begin(), sums.end());
    agree([&] {
      for (Index b = 0; b < shape.batch; ++b) {
        Index mine = 0;
        for (const Segment& s : shards_.segments(comm_.rank()))
          mine += std::clamp<Index>(valid[std::size_t(b)] - s.offset, 0, s.length);
        effattn::detail::require(
            mine == shape.valid_length(b), who_, effattn::detail::concat("shape.lengths[", b, "]"),
            shape.valid_length(b),
            effattn::detail::concat(mine, ": padding at the end of the whole sequence, which ",
                                    "has ", valid[std::size_t(b)], " valid positions"));
      }
    });
    return valid;
  }

  /// This rank's inputs: shape.seq its local length, q, k [batch·n_r × heads·d_key], v
  /// [batch·n_r × heads·d_value].
  template <class Q, class K, class V>
  void check_inputs(const Q& q, const K& k, const V& v, const SequenceShape& shape) const {
    effattn::detail::require(
        shape.seq == local_length(), who_, "shape.seq", shape.seq,
        effattn::detail::concat("this rank's rows per sequence, ", local_length()));
    effattn::detail::require(shape.batch >= 1, who_, "shape.batch", shape.batch, "at least 1");
    const Index rows = shape.batch * local_length();
    shape.validate(who_, "shape", shape.tokens());
    check_size(q, rows, layout_.heads * layout_.d_key, "q");
    check_size(k, rows, layout_.heads * layout_.d_key, "k");
    check_size(v, rows, layout_.heads * layout_.d_value, "v");
  }
  template <class M>
  void check_size(const M& m, Index rows, Index cols, const char* name) const {
    effattn::detail::require(
        m.rows() == rows && m.cols() == cols, who_, name,
        effattn::detail::concat("a ", m.rows(), " × ", m.cols(), " matrix"),
        effattn::detail::concat(rows, " × ", cols, " (batch · this rank's ", local_length(),
                                " rows × heads · head width)"));
  }
  /// The checks of a backward's arguments besides q, k, v (sizes; no gradient aliases an input).
  template <class S>
  void check_backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                      ConstView<S> d_out, View<S> dq, View<S> dk, View<S> dv) const {
    const Index h = layout_.heads, dkw = layout_.d_key, dvw = layout_.d_value;
    check_size(out, q.rows(), h * dvw, "out");
    check_size(d_out, q.rows(), h * dvw, "d_out");
    check_size(dq, q.rows(), h * dkw, "dq");
    check_size(dk, k.rows(), h * dkw, "dk");
    check_size(dv, v.rows(), h * dvw, "dv");
    for (auto [name, m] : {std::pair{"q", q}, {"k", k}, {"v", v}, {"out", out}, {"d_out", d_out}})
      for (auto [gname, g] : {std::pair{"dq", dq}, {"dk", dk}, {"dv", dv}})
        effattn::detail::require_disjoint(who_, gname, g, name, m);
  }
  template <class S>
  void check_forward_output(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out) const {
    check_size(out, q.rows(), layout_.heads * layout_.d_value, "out");
    for (auto [name, m] : {std::pair{"q", q}, {"k", k}, {"v", v}})
      effattn::detail::require_disjoint(who_, "out", out, name, m);
  }

  /// A forward's checks and the engine's own (`more`), agreed by every rank; then the valid
  /// positions of each whole sequence.
  template <class S, class More>
  std::vector<Index> begin_forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
                                   const SequenceShape& shape, More&& more) const {
    agree([&] {
      check_inputs(q, k, v, shape);
      check_forward_output<S>(q, k, v, out);
      more();
    });
    return whole_lengths(shape);
  }
  /// A backward's checks (`kept`: a forward kept its state for this shape) and the engine's
  /// own, agreed by every rank; then the valid positions of each whole sequence.
  template <class S, class More>
  std::vector<Index> begin_backward(ConstView<S> q, ConstView<S> k, ConstView<S> v,
                                    ConstView<S> out, ConstView<S> d_out, View<S> dq, View<S> dk,
                                    View<S> dv, const SequenceShape& shape, bool kept,
                                    More&& more) const {
    agree([&] {
      check_inputs(q, k, v, shape);
      effattn::detail::require(kept, who_, "backward",
                               "called without a forward that kept its state",
                               "a forward with keep_saved on the same shape, then backward");
      check_backward<S>(q, k, v, out, d_out, dq, dk, dv);
      more();
    });
    return whole_lengths(shape);
  }

  static bool same_shape(const SequenceShape& a, const SequenceShape& b) {
    return a.batch == b.batch && a.seq == b.seq && a.lengths == b.lengths;
  }

 private:
  const char* who_;
  HeadLayout layout_;
  Communicator comm_;
  SequenceShards shards_;
  std::int64_t own_fingerprint_ = 0;
};

}  // namespace effattn::mpi::detail

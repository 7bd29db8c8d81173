#pragma once
// Angular LSH for Reformer's attention: the bucket plan, the random rotations of every
// (head, round), and hashing a block of keys into buckets.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/packed_product.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail::lsh {

/// b buckets as b1 · b2 (b2 = 1: one argmax over b/2 columns).
struct BucketPlan {
  Index buckets, first, second;
  /// Rotation columns hashing needs: b1/2, plus b2/2 when factorised.
  Index columns() const { return first / 2 + (second > 1 ? second / 2 : 0); }
};

/// Buckets hashed with one argmax; above this the rotation is factorised.
inline constexpr Index max_unfactored = 128;

inline Index even_at_least(Index x) {
  return std::max<Index>(2, (x + 1) / 2 * 2);
}

/// The buckets of a sequence of n tokens: `buckets` as given (0: about 2n/chunk, even, at
/// least 2), factorised as b1·b2 above max_unfactored.
inline BucketPlan plan_buckets(Index n, Index chunk, Index buckets) {
  Index b = buckets;
  if (b == 0) {
    const Index target = std::max<Index>(2, 2 * ((n + chunk - 1) / chunk));
    if (target <= max_unfactored) return {target, target, 1};
    const Index b1 = even_at_least(Index(std::ceil(std::sqrt(double(target)))));
    const Index b2 = even_at_least((target + b1 - 1) / b1);
    return {b1 * b2, b1, b2};
  }
  if (b > max_unfactored)
    for (Index b1 = Index(std::sqrt(double(b))) / 2 * 2; b1 >= 2; b1 -= 2)
      if (b % b1 == 0 && (b / b1) % 2 == 0) return {b, b1, b / b1};
  return {b, b, 1};
}

/// argmax over [x ; −x] for x of `half` values: in [0, 2·half).
template <class S>
Index angular_argmax(const S* x, Index half) {
  Index hi = 0, lo = 0;
  for (Index j = 1; j < half; ++j) {
    if (x[j] > x[hi]) hi = j;
    if (x[j] < x[lo]) lo = j;
  }
  return x[hi] >= -x[lo] ? hi : half + lo;
}

/// The random rotation of every (head, round), d_k × columns, N(0, 1) entries drawn from
/// (seed, head·rounds + round) column by column: element (i, j) is normal number j·d_k + i
/// of its stream, so the first columns never depend on how many a call needs. A rotation
/// may be fixed (loaded); then calls needing more columns than it has are an Error.
/// Thread-safe: reads and draws hold a lock (planning draws, kernels only read).
template <class S>
class Rotations {
 public:
  Rotations(Index heads, Index rounds, Index d_key, std::uint64_t seed)
      : heads_(heads), rounds_(rounds), d_key_(d_key) {
    redraw(seed);
  }

  /// Drops every rotation (fixed ones too); later ones are drawn from `seed`.
  void redraw(std::uint64_t seed) {
    const std::lock_guard<std::mutex> lock(lock_.mutex);
    seed_ = seed;
    rotations_.assign(static_cast<std::size_t>(heads_ * rounds_), Rotation{});
  }

  /// The first `columns` columns of (head, round)'s rotation, drawn if need be.
  template <class Dst>
  void copy(Index head, Index round, Index columns, Dst&& dst) const {
    if (columns == 0) return;  // one bucket: nothing to hash with
    const std::lock_guard<std::mutex> lock(lock_.mutex);
    Rotation& rot = rotations_[index_of(head, round)];
    grow(rot, index_of(head, round), columns);
    dst = rot.matrix.leftCols(columns);
  }

  /// The seed the rotations that are not fixed are drawn from.
  std::uint64_t seed() const {
    const std::lock_guard<std::mutex> lock(lock_.mutex);
    return seed_;
  }
  /// Calls f(head, round, rotation) for every fixed rotation, in (head, round) order.
  template <class F>
  void for_each_fixed(F&& f) const {
    const std::lock_guard<std::mutex> lock(lock_.mutex);
    for (std::size_t i = 0; i < rotations_.size(); ++i)
      if (rotations_[i].fixed) f(Index(i) / rounds_, Index(i) % rounds_, rotations_[i].matrix);
  }

  /// Fixes (head, round)'s rotation to r.
  void fix(Index head, Index round, const Matrix<S>& r) {
    const std::lock_guard<std::mutex> lock(lock_.mutex);
    rotations_[index_of(head, round)] = Rotation{r, true};
  }

  /// Makes every rotation `columns` wide: draws what is missing; a fixed rotation that is
  /// narrower is an Error from `component` naming it (`why` says what needs the columns).
  void prepare(Index columns, const char* component, const std::string& why) const {
    const std::lock_guard<std::mutex> lock(lock_.mutex);
    for (std::size_t i = 0; i < rotations_.size(); ++i)
      require(!rotations_[i].fixed || rotations_[i].matrix.cols() >= columns, component, "rotation",
              concat("head ", Index(i) / rounds_, " round ", Index(i) % rounds_, " fixed at ",
                     rotations_[i].matrix.cols(), " columns"),
              concat("at least ", columns, " columns ", why));
    for (std::size_t i = 0; i < rotations_.size(); ++i)
      grow(rotations_[i], i, columns);
  }

 private:
  struct Rotation {
    Matrix<S> matrix;  // d_k × columns drawn so far, or the fixed rotation
    bool fixed = false;
  };

  std::size_t index_of(Index head, Index round) const {
    return static_cast<std::size_t>(head * rounds_ + round);
  }
  // Draws the columns not drawn yet (caller holds the lock).
  void grow(Rotation& rot, std::size_t index, Index columns) const {
    if (rot.fixed || rot.matrix.cols() >= columns) return;
    const Index old = rot.matrix.cols();
    Matrix<S> grown(d_key_, columns);
    if (old > 0) grown.leftCols(old) = rot.matrix;
    const CounterRng rng(seed_, 0x4c534800ull + index);
    for (Index j = old; j < columns; ++j)
      for (Index i = 0; i < d_key_; ++i)
        grown(i, j) = static_cast<S>(rng.normal(std::uint64_t(j * d_key_ + i)));
    rot.matrix = std::move(grown);
  }

  Index heads_, rounds_, d_key_;
  std::uint64_t seed_ = 0;
  mutable std::vector<Rotation> rotations_;
  mutable CopyableMutex lock_;
};

/// Tokens hashed per product.
inline constexpr Index hash_rows = 256;

/// Workspace hash_keys takes.
template <class S>
std::size_t hashing_bytes(Index n, Index d_k, Index rounds, const BucketPlan& bp) {
  return Workspace::bytes_for<S>(d_k * rounds * bp.columns()) +
         Workspace::bytes_for<S>(std::min(hash_rows, n) * rounds * bp.columns()) +
         Products<S>::bytes(Products<S>::capacity(d_k, rounds * bp.columns()));
}

/// bucket[round·n + t] for every round and keys t of rows [t0, t1) of the first `length` of
/// k (all of them by default): the angular argmax of k_t times the round's rotation (two
/// argmaxes when factorised, h1 + b1·h2). `rotation` gives (round, columns, dst) the round's
/// rotation. A key's buckets do not depend on the rows hashed with it.
template <class S, class RotationOf>
void hash_keys(ConstView<S> k, Index length, Index rounds, const BucketPlan& bp,
               RotationOf&& rotation, std::int32_t* bucket, Workspace& ws, Index t0 = 0,
               Index t1 = -1) {
  Workspace::Frame frame(ws);
  const Index n = k.rows(), cols = bp.columns();
  t1 = t1 < 0 ? length : std::min(t1, length);
  if (t1 <= t0) return;
  if (bp.buckets == 1) {  // no hashing: one bucket
    for (Index round = 0; round < rounds; ++round)
      std::fill(bucket + round * n + t0, bucket + round * n + t1, 0);
    return;
  }
  auto rot = ws.matrix<S>(k.cols(), rounds * cols);
  for (Index round = 0; round < rounds; ++round)
    rotation(round, cols, rot.middleCols(round * cols, cols));
  auto proj = ws.matrix<S>(std::min(hash_rows, t1 - t0), rounds * cols);
  const Products<S> mul(ws, Products<S>::capacity(k.cols(), rounds * cols));
  for (Index r0 = t0; r0 < t1; r0 += hash_rows) {
    const Index rows = std::min(hash_rows, t1 - r0);
    mul.assign(proj.topRows(rows), k.middleRows(r0, rows), rot);
    for (Index i = 0; i < rows; ++i)
      for (Index round = 0; round < rounds; ++round) {
        const S* x = &proj(i, round * cols);
        Index h = angular_argmax(x, bp.first / 2);
        if (bp.second > 1) h += bp.first * angular_argmax(x + bp.first / 2, bp.second / 2);
        bucket[round * n + r0 + i] = static_cast<std::int32_t>(h);
      }
  }
}

}  // namespace effattn::detail::lsh

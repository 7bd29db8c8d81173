#pragma once
// LockedGradient: a learned projection's gradient, which the heads and sequences sharing the
// projection add to.

#include <cstddef>
#include <mutex>

#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

namespace detail {

/// A learned projection's gradient. add(f) lets f add to it under a lock (a backward called
/// directly, from any thread); a caller that owns some of its columns for a while (LowRank's
/// backward_projections: one task per block of columns, each adding its parts in a fixed order)
/// writes them through gradient(rows, cols) without the lock, after making it before its threads
/// start.
template <class S>
class LockedGradient {
 public:
  /// The gradient, made (zero, rows × cols) on first use: make it before threads share it.
  Matrix<S>& gradient(Index rows, Index cols) {
    if (gradient_.size() == 0) gradient_.setZero(rows, cols);
    return gradient_;
  }
  const Matrix<S>& gradient() const { return gradient_; }
  void zero() {
    if (gradient_.size() > 0) gradient_.setZero();
  }
  template <class F>
  void add(Index rows, Index cols, F&& f) {
    const std::lock_guard<std::mutex> lock(lock_.mutex);
    f(gradient(rows, cols));
  }

 private:
  Matrix<S> gradient_;
  CopyableMutex lock_;
};

}  // namespace detail

}  // namespace effattn

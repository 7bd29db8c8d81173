#pragma once
// GradientSums: a learned projection's gradient, summed per worker for a reproducible backward.

#include <algorithm>
#include <cstddef>
#include <mutex>
#include <vector>

#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

namespace detail {

/// A learned projection's gradient and, during a parallel backward, one partial sum per
/// worker: begin(workers, rows, cols, used) zeroes them, add(worker, f) lets f add to the
/// worker's sum, end() adds the sums to the gradient in worker order (bitwise reproducible for
/// a fixed worker count). The partial sums cover only the first `used` columns the call can
/// touch (Linformer's E: the call's tokens, not n_max), so a call on short sequences neither
/// zeroes nor adds a whole k × n_max matrix per worker. Outside begin/end, add goes straight to
/// the gradient under a lock.
template <class S>
class GradientSums {
 public:
  /// The gradient, made (zero, rows × cols) on first use.
  Matrix<S>& gradient(Index rows, Index cols) {
    if (gradient_.size() == 0) gradient_.setZero(rows, cols);
    return gradient_;
  }
  const Matrix<S>& gradient() const { return gradient_; }
  void zero() {
    if (gradient_.size() > 0) gradient_.setZero();
  }

  void begin(int workers, Index rows, Index cols, Index used) {
    gradient(rows, cols);
    if (partial_.size() < static_cast<std::size_t>(workers))
      partial_.resize(static_cast<std::size_t>(workers));
    used_ = std::min(used, cols);
    for (auto& p : partial_)
      p.setZero(rows, used_);
    active_ = workers;
  }
  template <class F>
  void add(int worker, Index rows, Index cols, F&& f) {
    if (worker < active_) {
      f(partial_[static_cast<std::size_t>(worker)]);
      return;
    }
    const std::lock_guard<std::mutex> lock(lock_.mutex);
    f(gradient(rows, cols));
  }
  void end() {
    for (int w = 0; w < active_; ++w)
      gradient_.leftCols(used_) += partial_[static_cast<std::size_t>(w)];
    active_ = 0;
  }

 private:
  Matrix<S> gradient_;
  std::vector<Matrix<S>> partial_;  // one per worker: rows × used_ (reallocated when used_ changes)
  Index used_ = 0;
  int active_ = 0;
  CopyableMutex lock_;
};

}  // namespace detail

}  // namespace effattn

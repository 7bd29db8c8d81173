#pragma once
// GradientSums: a learned projection's gradient, summed per worker for a reproducible backward.

#include <cstddef>
#include <mutex>
#include <vector>

#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

namespace detail {

/// A learned projection's gradient and, during a parallel backward, one partial sum per
/// worker: begin(workers, …) zeroes them, add(worker, f) lets f add to the worker's sum,
/// end() adds the sums to the gradient in worker order (bitwise reproducible for a fixed
/// worker count). Outside begin/end, add goes straight to the gradient under a lock.
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

  void begin(int workers, Index rows, Index cols) {
    gradient(rows, cols);
    if (partial_.size() < static_cast<std::size_t>(workers))
      partial_.resize(static_cast<std::size_t>(workers));
    for (auto& p : partial_)
      p.setZero(rows, cols);
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
      gradient_ += partial_[static_cast<std::size_t>(w)];
    active_ = 0;
  }

 private:
  Matrix<S> gradient_;
  std::vector<Matrix<S>> partial_;  // one per worker, kept between calls (no reallocation)
  int active_ = 0;
  CopyableMutex lock_;
};

}  // namespace detail

}  // namespace effattn

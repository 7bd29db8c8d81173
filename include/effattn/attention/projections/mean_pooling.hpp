#pragma once
// MeanPooling: averages windows of `kernel` tokens (no parameters).

#include <cstddef>

#include "effattn/attention/projections/sequence_projection.hpp"
#include "effattn/attention/projections/windows.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// Mean pooling over windows of `kernel` tokens with stride `kernel` (no parameters):
/// y_i = (1/kernel) Σ_t x_{i·kernel+t}; n must be a multiple of kernel, and gives n/kernel
/// rows. Padding tokens count as zeros; windows made only of padding are masked.
template <class S = float>
class MeanPooling : public detail::Windows {
 public:
  using Scalar = S;
  static constexpr const char* name = "mean_pooling";
  static constexpr bool learned = false;

  MeanPooling(const Config& config, CounterRng) : Windows(config, "MeanPooling") {}

  std::size_t scratch_bytes(Index, Index) const { return 0; }

  void forward(ConstView<S> x, Index valid, View<S> y, Workspace&) const {
    const Index kernel = this->kernel();
    const S inv = S(1) / S(kernel);
    for (Index i = 0; i < y.rows(); ++i) {
      const Index first = i * kernel, count = this->count(i, valid);
      if (count == 0)
        y.row(i).setZero();
      else
        y.row(i) = inv * x.middleRows(first, count).colwise().sum();
    }
  }

  void backward(ConstView<S>, Index valid, ConstView<S> dy, View<S> dx, Workspace&) {
    const Index kernel = this->kernel();
    const S inv = S(1) / S(kernel);
    for (Index j = 0; j < dx.rows(); ++j) {
      if (j < valid)
        dx.row(j) = inv * dy.row(j / kernel);
      else
        dx.row(j).setZero();
    }
  }
};

static_assert(SequenceProjection<MeanPooling<float>>);

}  // namespace effattn

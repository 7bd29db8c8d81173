#pragma once
// MaxPooling: the largest value of each feature over windows of `kernel` tokens (no parameters).

#include <cstddef>
#include <limits>

#include "effattn/attention/projections/sequence_projection.hpp"
#include "effattn/attention/projections/windows.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// Max pooling over windows of `kernel` tokens with stride `kernel` (no parameters):
/// y_ic = max_t x_{i·kernel+t, c} over the window's valid tokens; padding tokens are left
/// out of the maximum (a zero would win over negative values), and windows made only of
/// padding are masked. The gradient goes to the first maximal token of each window.
template <class S = float>
class MaxPooling : public detail::Windows {
 public:
  using Scalar = S;
  static constexpr const char* name = "max_pooling";
  static constexpr bool learned = false;

  MaxPooling(const Config& config, CounterRng) : Windows(config, "MaxPooling") {}

  std::size_t scratch_bytes(Index, Index) const { return 0; }

  void forward(ConstView<S> x, Index valid, View<S> y, Workspace&) const {
    const Index kernel = this->kernel();
    for (Index i = 0; i < y.rows(); ++i) {
      const Index first = i * kernel, count = this->count(i, valid);
      if (count == 0)
        y.row(i).setZero();
      else
        y.row(i) = x.middleRows(first, count).colwise().maxCoeff();
    }
  }

  void backward(ConstView<S> x, Index valid, ConstView<S> dy, View<S> dx, Workspace&) {
    const Index kernel = this->kernel(), w = x.cols();
    dx.setZero();
    for (Index i = 0; i < dy.rows(); ++i) {
      const Index first = i * kernel, count = this->count(i, valid);
      for (Index c = 0; c < w && count > 0; ++c) {
        Index best = first;
        for (Index j = first + 1; j < first + count; ++j)
          if (x(j, c) > x(best, c)) best = j;
        dx(best, c) = dy(i, c);
      }
    }
  }
};

static_assert(SequenceProjection<MaxPooling<float>>);

}  // namespace effattn

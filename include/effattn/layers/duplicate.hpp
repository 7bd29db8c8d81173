#pragma once
// Duplicate: d → 2d, y = [x | x], the way into a reversible stack.

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/composition.hpp"

namespace effattn {

/// d → 2d: y = [x | x], entering a reversible stack. Backward: dx = dy1 + dy2.
template <class S = float>
class Duplicate : public detail::Stateless {
 public:
  using Scalar = S;
  static constexpr bool position_wise = true;
  struct Config {
    Index d_model = 512;  ///< input width (the output is twice as wide)
  };
  explicit Duplicate(Config config) : width_(config.d_model) {
    detail::require(width_ > 0, "Duplicate", "d_model", width_, "at least 1");
  }
  Index d_in() const { return width_; }
  Index d_out() const { return 2 * width_; }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_call("Duplicate", x, d_in(), "y", y, d_out(), shape);
    y.leftCols(width_) = x;
    y.rightCols(width_) = x;
  }
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("Duplicate", x, d_in(), dy, d_out(), dx, shape);
    dx = dy.leftCols(width_) + dy.rightCols(width_);
  }

 private:
  Index width_;
};

}  // namespace effattn

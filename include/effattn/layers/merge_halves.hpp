#pragma once
// MergeHalves (and its Merge mode): 2d → 2d or d, the way out of a reversible stack.

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/composition.hpp"

namespace effattn {

/// How MergeHalves leaves a reversible stack: `concat` keeps [y1 | y2] (2d wide, as
/// Reformer's reference code and Hugging Face's ReformerModel do), `mean` gives (y1 + y2)/2.
enum class Merge { concat, mean };

/// 2d → 2d (concat) or 2d → d (mean): leaving a reversible stack.
template <class S = float>
class MergeHalves : public detail::Stateless {
 public:
  using Scalar = S;
  static constexpr bool position_wise = true;
  struct Config {
    Index d_model = 512;  ///< width of each half
    Merge merge = Merge::concat;
  };
  explicit MergeHalves(Config config) : config_(config) {
    detail::require(config.d_model > 0, "MergeHalves", "d_model", config.d_model, "at least 1");
  }
  Index d_in() const { return 2 * config_.d_model; }
  Index d_out() const { return config_.merge == Merge::mean ? config_.d_model : d_in(); }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_call("MergeHalves", x, d_in(), "y", y, d_out(), shape);
    const Index d = config_.d_model;
    if (config_.merge == Merge::mean)
      y = S(0.5) * (x.leftCols(d) + x.rightCols(d));
    else
      y = x;
  }
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("MergeHalves", x, d_in(), dy, d_out(), dx, shape);
    const Index d = config_.d_model;
    if (config_.merge == Merge::mean) {
      dx.leftCols(d) = S(0.5) * dy;
      dx.rightCols(d) = S(0.5) * dy;
    } else {
      dx = dy;
    }
  }

 private:
  Config config_;
};

}  // namespace effattn

#pragma once
// ConvProjection: a learned strided 1-D convolution along the sequence (kernel = stride).

#include <cmath>
#include <cstddef>
#include <string_view>

#include "effattn/attention/projections/locked_gradient.hpp"
#include "effattn/attention/projections/sequence_projection.hpp"
#include "effattn/attention/projections/windows.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// A learned strided 1-D convolution along the sequence, kernel = stride:
/// y_i = Σ_t f_t · x_{i·kernel+t}, one filter f ∈ ℝ^kernel applied to every feature (a 1-in,
/// 1-out channel Conv1d over each column; equivalently a dense E whose row i holds f at
/// columns i·kernel …). Initialised f_t ~ N(0, 1/kernel). n must be a multiple of kernel
/// and gives n/kernel rows; padding tokens count as zeros and windows made only of
/// padding are masked. Cost 2·n·w forward, 4·n·w backward.
template <class S = float>
class ConvProjection : public detail::Windows {
 public:
  using Scalar = S;
  static constexpr const char* name = "conv";
  static constexpr bool learned = true;

  ConvProjection(const Config& config, CounterRng rng) : Windows(config, "ConvProjection") {
    filter_.resize(1, kernel());
    rng.fill_normal(filter_, 1.0 / std::sqrt(double(kernel())));
    gradient_.gradient(1, kernel());
  }

  std::size_t scratch_bytes(Index, Index) const { return Workspace::bytes_for<S>(kernel()); }

  void forward(ConstView<S> x, Index valid, View<S> y, Workspace&) const {
    const Index kernel = this->kernel();
    for (Index i = 0; i < y.rows(); ++i) {
      const Index first = i * kernel, count = this->count(i, valid);
      y.row(i).noalias() = filter_.leftCols(count) * x.middleRows(first, count);
    }
  }

  void backward(ConstView<S> x, Index valid, ConstView<S> dy, View<S> dx, Workspace& ws) {
    Workspace::Frame frame(ws);
    const Index kernel = this->kernel();
    auto d_f = ws.matrix<S>(1, kernel);
    d_f.setZero();
    for (Index i = 0; i < dy.rows(); ++i) {
      const Index first = i * kernel, count = this->count(i, valid);
      auto window = dx.middleRows(first, kernel);
      window.noalias() = filter_.transpose() * dy.row(i);
      window.bottomRows(kernel - count).setZero();
      d_f.leftCols(count).noalias() += dy.row(i) * x.middleRows(first, count).transpose();
    }
    gradient_.add(1, kernel, [&](Matrix<S>& g) { g += d_f; });
  }

  template <class F>
  void visit_parameters(F&& f, std::string_view label) {
    f(label, filter_, gradient_.gradient(1, kernel()));
  }
  void zero_grad() { gradient_.zero(); }

  /// The filter f [1 × kernel].
  const Matrix<S>& weight() const { return filter_; }
  void set_weight(const Matrix<S>& f) {
    detail::require(f.rows() == 1 && f.cols() == kernel(), "ConvProjection", "filter",
                    detail::concat("a ", f.rows(), "×", f.cols(), " matrix"),
                    detail::concat("1 × kernel = 1×", kernel()));
    filter_ = f;
  }
  const Matrix<S>& gradient() const { return gradient_.gradient(); }

 private:
  Matrix<S> filter_;
  detail::LockedGradient<S> gradient_;
};

static_assert(SequenceProjection<ConvProjection<float>>);

}  // namespace effattn

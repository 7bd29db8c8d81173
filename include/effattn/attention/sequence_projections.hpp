#pragma once
// Projections along the sequence for LowRank (Linformer): n tokens in, a few rows out.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>
#include <string_view>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/product.hpp"
#include "effattn/core/rng.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

// A projection type P<S> maps x [n × w] (keys or values of one head) to y [rows(n) × w]:
//   Config                      its settings
//   P(Config, CounterRng)        construction; learned projections draw their weights
//   rows(n)                     output rows for n tokens
//   visible_rows(n, valid)      output rows that see at least one of the first `valid`
//                               tokens (the rest are wholly padding and get masked)
//   check(component, n)         effattn::Error if n tokens cannot be projected
//   scratch_bytes(n, w)         workspace its forward or backward takes
//   forward(x, valid, y, ws)    rows of x at or past `valid` are padding: treated as zero
//   backward(x, valid, dy, dx, ws, worker)  writes dx (0 on padding); learned projections
//                               also add to their gradient: into worker's partial sum
//                               between begin_backward(workers) and end_backward() (which
//                               adds the partial sums in worker order), else under a lock
//   learned                     whether it has parameters (visit_parameters, zero_grad)

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

/// The geometry the windowed projections share (window length = stride = kernel): n tokens
/// give n/kernel rows; row i reads tokens i·kernel … i·kernel + kernel − 1.
class Windows {
 public:
  struct Config {
    Index kernel = 16;  ///< window (or filter) length, and stride
  };

  Windows(const Config& config, std::string_view component) : config_(config) {
    require(config_.kernel > 0, component, "kernel", config_.kernel, "at least 1 token");
  }

  const Config& config() const { return config_; }
  Index rows(Index n) const { return n / config_.kernel; }
  Index visible_rows(Index, Index valid) const {
    return (valid + config_.kernel - 1) / config_.kernel;
  }
  void check(std::string_view component, Index n) const {
    require(n % config_.kernel == 0, component, "n", n,
            concat("a multiple of the projection's kernel (", config_.kernel,
                   "): pooling and convolution take whole windows"));
  }

 protected:
  Index kernel() const { return config_.kernel; }
  /// Tokens of window i before `valid` (the rest are padding).
  Index count(Index i, Index valid) const {
    return std::clamp<Index>(valid - i * config_.kernel, 0, config_.kernel);
  }

 private:
  Config config_;
};

}  // namespace detail

/// Linformer's learned projection (ALGORITHMS.md §3): y = E[:, :n] · x with E ∈ ℝ^{k × n_max},
/// initialised as a Johnson–Lindenstrauss projection, E_ij ~ N(0, 1/k). An input of n < n_max
/// tokens uses the first n columns; more than n_max is an error. Padding tokens are treated
/// as zero rows, which makes a padded sequence of valid length L behave exactly as an
/// unpadded one of length L. Every output row mixes every token, so none is masked.
/// Cost 2·k·n·w forward, twice that backward (dx and dE).
template <class S = float>
class DenseProjection {
 public:
  using Scalar = S;
  static constexpr const char* name = "dense";
  static constexpr bool learned = true;

  struct Config {
    Index k = 256;       ///< rows of the projection
    Index n_max = 4096;  ///< longest sequence it accepts (columns of E)
  };

  DenseProjection(const Config& config, CounterRng rng) : config_(config) {
    constexpr const char* who = "DenseProjection";
    detail::require(config_.n_max > 0, who, "n_max", config_.n_max, "at least 1 token");
    detail::require(config_.k > 0 && config_.k <= config_.n_max, who, "k", config_.k,
                    detail::concat("a rank in [1, n_max = ", config_.n_max, "]"));
    weight_.resize(config_.k, config_.n_max);
    rng.fill_normal(weight_, 1.0 / std::sqrt(double(config_.k)));
  }

  const Config& config() const { return config_; }
  Index rows(Index) const { return config_.k; }
  Index visible_rows(Index, Index valid) const { return valid > 0 ? config_.k : 0; }

  void check(std::string_view component, Index n) const {
    detail::require(n <= config_.n_max, component, "n", n,
                    detail::concat("at most n_max = ", config_.n_max,
                                   " tokens (the longest sequence the projection E was made for)"));
  }

  std::size_t scratch_bytes(Index, Index) const {
    return Workspace::bytes_for<S>(config_.k * column_block);
  }

  void forward(ConstView<S> x, Index valid, View<S> y, Workspace&) const {
    if (valid == 0) {
      y.setZero();
      return;
    }
    detail::sliced_product<false>(y, weight_.leftCols(valid), x.topRows(valid));
  }

  void backward(ConstView<S> x, Index valid, ConstView<S> dy, View<S> dx, Workspace& ws,
                int worker = 0) {
    Workspace::Frame frame(ws);
    auto d_e = ws.matrix<S>(config_.k, std::min(column_block, std::max<Index>(valid, 1)));
    for (Index j0 = 0; j0 < valid; j0 += column_block) {
      const Index cols = std::min(column_block, valid - j0);
      detail::sliced_product<false>(dx.middleRows(j0, cols),
                                    weight_.middleCols(j0, cols).transpose(), dy);
      auto de = d_e.leftCols(cols);
      detail::sliced_product<false>(de, dy, x.middleRows(j0, cols).transpose());
      sums_.add(worker, config_.k, config_.n_max,
                [&](Matrix<S>& g) { g.middleCols(j0, cols) += de; });
    }
    dx.bottomRows(x.rows() - valid).setZero();
  }
  void begin_backward(int workers) { sums_.begin(workers, config_.k, config_.n_max); }
  void end_backward() { sums_.end(); }

  template <class F>
  void visit_parameters(F&& f, std::string_view label) {
    f(label, weight_, sums_.gradient(config_.k, config_.n_max));
  }
  void zero_grad() { sums_.zero(); }

  /// E [k × n_max].
  const Matrix<S>& weight() const { return weight_; }
  void set_weight(const Matrix<S>& e) {
    detail::require(e.rows() == config_.k && e.cols() == config_.n_max, "DenseProjection", "E",
                    detail::concat("a ", e.rows(), "×", e.cols(), " matrix"),
                    detail::concat("k × n_max = ", config_.k, "×", config_.n_max));
    weight_ = e;
  }
  /// dE [k × n_max], or an empty matrix until the first backward or visit (a projection
  /// used only for inference never holds a second k × n_max matrix).
  const Matrix<S>& gradient() const { return sums_.gradient(); }

 private:
  // Tokens per step of backward: dE for this many columns is made in scratch, then added
  // to the worker's partial sum.
  static constexpr Index column_block = 256;

  Config config_;
  Matrix<S> weight_;
  detail::GradientSums<S> sums_;
};

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

  void backward(ConstView<S>, Index valid, ConstView<S> dy, View<S> dx, Workspace&, int = 0) {
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

  void backward(ConstView<S> x, Index valid, ConstView<S> dy, View<S> dx, Workspace&, int = 0) {
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
    sums_.gradient(1, kernel());
  }

  std::size_t scratch_bytes(Index, Index) const { return Workspace::bytes_for<S>(kernel()); }

  void forward(ConstView<S> x, Index valid, View<S> y, Workspace&) const {
    const Index kernel = this->kernel();
    for (Index i = 0; i < y.rows(); ++i) {
      const Index first = i * kernel, count = this->count(i, valid);
      y.row(i).noalias() = filter_.leftCols(count) * x.middleRows(first, count);
    }
  }

  void backward(ConstView<S> x, Index valid, ConstView<S> dy, View<S> dx, Workspace& ws,
                int worker = 0) {
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
    sums_.add(worker, 1, kernel, [&](Matrix<S>& g) { g += d_f; });
  }
  void begin_backward(int workers) { sums_.begin(workers, 1, kernel()); }
  void end_backward() { sums_.end(); }

  template <class F>
  void visit_parameters(F&& f, std::string_view label) {
    f(label, filter_, sums_.gradient(1, kernel()));
  }
  void zero_grad() { sums_.zero(); }

  /// The filter f [1 × kernel].
  const Matrix<S>& weight() const { return filter_; }
  void set_weight(const Matrix<S>& f) {
    detail::require(f.rows() == 1 && f.cols() == kernel(), "ConvProjection", "filter",
                    detail::concat("a ", f.rows(), "×", f.cols(), " matrix"),
                    detail::concat("1 × kernel = 1×", kernel()));
    filter_ = f;
  }
  const Matrix<S>& gradient() const { return sums_.gradient(); }

 private:
  Matrix<S> filter_;
  detail::GradientSums<S> sums_;
};

}  // namespace effattn

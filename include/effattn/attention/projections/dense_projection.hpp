#pragma once
// DenseProjection: Linformer's learned projection E along the sequence (k × n_max).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string_view>

#include "effattn/attention/projections/locked_gradient.hpp"
#include "effattn/attention/projections/sequence_projection.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/packed_product.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// Linformer's learned projection (docs/algorithms.md §3): y = E[:, :n] · x with E ∈ ℝ^{k × n_max},
/// initialised as a Johnson–Lindenstrauss projection, E_ij ~ N(0, 1/k). An input of n < n_max
/// tokens uses the first n columns; more than n_max is an error. Padding tokens are treated
/// as zero rows, which makes a padded sequence of valid length L behave exactly as an
/// unpadded one of length L. Every output row mixes every token, so none is masked.
/// Cost 2·k·n·w forward, twice that backward (dx and dE); in float the products run on the
/// micro-kernel (core/packed_product.hpp), E read in place.
template <class S = float>
class DenseProjection {
 public:
  using Scalar = S;
  static constexpr const char* name = "dense";
  /// Tokens per step: forward adds E's columns times x's rows a block at a time, backward makes
  /// dx and dE of a block at a time (backward_rows and add_gradient_columns take at most this
  /// many), so the packed operands stay O(column_block·w).
  static constexpr Index column_block = 1024;
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

  std::size_t scratch_bytes(Index n, Index w) const {
    return std::max(Products::bytes(forward_capacity(n, w)), Products::bytes(backward_capacity(w)));
  }

  /// y = E[:, first : first + n] · x (x's rows from `valid` on as zeros). `first` > 0 projects
  /// a part of a longer sequence that starts at position `first` (a shard: the parts' y add
  /// up to the whole sequence's); first + x.rows() must be at most n_max.
  void forward(ConstView<S> x, Index valid, View<S> y, Workspace& ws, Index first = 0) const {
    forward_rows(x, valid, y, 0, ws, first);
  }

  /// Rows [row, row + y.rows()) of forward's y: a block of the projected rows, which LowRank
  /// computes on threads of their own.
  void forward_rows(ConstView<S> x, Index valid, View<S> y, Index row, Workspace& ws,
                    Index first = 0) const {
    if (valid == 0) {
      y.setZero();
      return;
    }
    Workspace::Frame frame(ws);
    const Products mul(ws, forward_capacity(valid, x.cols()));
    const Index rows = y.rows();
    for (Index j0 = 0; j0 < valid; j0 += column_block) {
      const Index cols = std::min(column_block, valid - j0);
      if (j0 == 0)
        mul.assign(y, weight_.block(row, first, rows, cols), x.topRows(cols));
      else
        mul.add(y, weight_.block(row, first + j0, rows, cols), x.middleRows(j0, cols));
    }
  }

  /// dx from dy, and dE's columns [first, first + valid) added to (see forward), under the
  /// gradient's lock: backward_rows and add_gradient_columns over blocks of tokens.
  void backward(ConstView<S> x, Index valid, ConstView<S> dy, View<S> dx, Workspace& ws,
                Index first = 0) {
    for (Index j0 = 0; j0 < valid; j0 += column_block) {
      const Index cols = std::min(column_block, valid - j0);
      backward_rows(dy, dx.middleRows(j0, cols), first + j0, ws);
      gradient_.add(config_.k, config_.n_max, [&](Matrix<S>& g) {
        add_columns(g, x.middleRows(j0, cols), dy, first + j0, ws);
      });
    }
    dx.bottomRows(x.rows() - valid).setZero();
  }

  /// The rows of backward's dx for the tokens at positions [column, column + dx.rows()), all
  /// valid: dx = E[:, column …]ᵀ · dy. At most column_block rows.
  void backward_rows(ConstView<S> dy, View<S> dx, Index column, Workspace& ws) const {
    Workspace::Frame frame(ws);
    const Products mul(ws, backward_capacity(dy.cols()));
    mul.assign(dx, weight_.middleCols(column, dx.rows()).transpose(), dy);
  }
  /// Adds dy · xᵀ to dE's columns [column, column + x.rows()) (x: the tokens there, all valid;
  /// at most column_block), without a lock: the caller owns those columns while it runs, and
  /// made the gradient first (prepare_gradient).
  void add_gradient_columns(ConstView<S> x, ConstView<S> dy, Index column, Workspace& ws) {
    add_columns(gradient_.gradient(config_.k, config_.n_max), x, dy, column, ws);
  }
  /// Makes dE (zero) if it does not exist yet: before threads add to its columns.
  void prepare_gradient() { gradient_.gradient(config_.k, config_.n_max); }

  template <class F>
  void visit_parameters(F&& f, std::string_view label) {
    f(label, weight_, gradient_.gradient(config_.k, config_.n_max));
  }
  void zero_grad() { gradient_.zero(); }

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
  const Matrix<S>& gradient() const { return gradient_.gradient(); }

 private:
  using Products = detail::Products<S>;

  void add_columns(Matrix<S>& g, ConstView<S> x, ConstView<S> dy, Index column,
                   Workspace& ws) const {
    Workspace::Frame frame(ws);
    const Products mul(ws, backward_capacity(dy.cols()));
    mul.add(g.middleCols(column, x.rows()), dy, x.transpose());
  }

  // Forward packs a block of x (≤ column_block × w); backward packs dy (k × w), then a block
  // of xᵀ (w × column_block).
  static Index forward_capacity(Index n, Index w) {
    return Products::capacity(std::min(n, column_block), w);
  }
  Index backward_capacity(Index w) const {
    return std::max(Products::capacity(config_.k, w), Products::capacity(w, column_block));
  }

  Config config_;
  Matrix<S> weight_;
  detail::LockedGradient<S> gradient_;
};

static_assert(SequenceProjection<DenseProjection<float>>);

}  // namespace effattn

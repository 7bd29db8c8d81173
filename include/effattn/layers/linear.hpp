#pragma once
// Linear: y = x·W + b, the output head of a language model (and any learned affine map).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/gradients.hpp"
#include "effattn/layers/embedding.hpp"
#include "effattn/layers/layer.hpp"

namespace effattn {

/// y = x·W + b per token, W ∈ ℝ^{d_in × d_out} drawn from N(0, 1/d_in), b = 0 (parameters
/// `w`, `b`). Position-wise and stateless between calls: backward needs only x, so a
/// training forward keeps nothing.
///
/// Weight tying (Press & Wolf 2017): after tie(embedding), W is the embedding's table
/// transposed (d_in = its d_model, d_out = its vocab), the head's own `w` is dropped from
/// visit_parameters, and backward adds W's gradient to the embedding's table gradient. The
/// head then refers to the embedding, which must outlive it (and not move).
template <class S = float>
class Linear {
 public:
  using Scalar = S;
  static constexpr bool position_wise = true;
  static constexpr std::string_view parameter_group = "linear";

  struct Config {
    Index d_in = 512;
    Index d_out = 512;
    bool bias = true;
    std::uint64_t seed = 0;
  };

  explicit Linear(Config config) : config_(config) {
    detail::require(config.d_in > 0, "Linear", "d_in", config.d_in, "at least 1");
    detail::require(config.d_out > 0, "Linear", "d_out", config.d_out, "at least 1");
    w_.resize(config.d_in, config.d_out);
    CounterRng(config.seed, 1).fill_normal(w_, 1.0 / std::sqrt(double(config.d_in)));
    if (config.bias) b_.setZero(1, config.d_out);
    zero_grad();
  }

  Index d_in() const { return config_.d_in; }
  Index d_out() const { return config_.d_out; }
  const Config& config() const { return config_; }
  /// W (d_in × d_out); for a tied head, a copy of the embedding's table transposed.
  Matrix<S> weight() const { return tied_ ? Matrix<S>(tied_->table().transpose()) : w_; }

  /// Uses `embedding`'s table as W from now on (see above). Its d_model and vocab must be
  /// this head's d_in and d_out.
  void tie(Embedding<S>& embedding) {
    detail::require(
        embedding.d_model() == config_.d_in && embedding.vocab() == config_.d_out, "Linear",
        "embedding", detail::concat("a ", embedding.vocab(), " × ", embedding.d_model(), " table"),
        detail::concat("vocab = d_out = ", config_.d_out, " and d_model = d_in = ", config_.d_in,
                       " to tie the head to it"));
    tied_ = &embedding;
    w_.resize(0, 0);
    g_w_.resize(0, 0);
  }
  bool tied() const { return tied_ != nullptr; }

  void set_training(bool) {}
  void release_activations() {}
  std::size_t activation_bytes() const { return 0; }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_call("Linear", x, d_in(), "y", y, d_out(), shape);
    if (tied_)
      y.noalias() = x * tied_->table().transpose();
    else
      y.noalias() = x * w_;
    if (config_.bias) y.rowwise() += b_.row(0);
  }

  /// dx = dy·Wᵀ; adds xᵀ·dy to W's gradient and the column sums of dy to b's.
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("Linear", x, d_in(), dy, d_out(), dx, shape);
    if (config_.bias) detail::add_bias_gradient(g_b_, dy, shape);
    if (tied_) {
      shape.for_each_valid_run([&](Index r0, Index rows) {
        tied_->dense_gradient().noalias() +=
            dy.middleRows(r0, rows).transpose() * x.middleRows(r0, rows);
      });
      dx.noalias() = dy * tied_->table();
    } else {
      detail::add_weight_gradient(g_w_, x, dy, shape);
      dx.noalias() = dy * w_.transpose();
    }
  }

  template <class F>
  void visit_parameters(F&& f) {
    if (!tied_) f(std::string_view("w"), w_, g_w_);
    if (config_.bias) f(std::string_view("b"), b_, g_b_);
  }
  /// Clears the head's own gradients (a tied head's W is the embedding's: its zero_grad).
  void zero_grad() {
    g_w_.setZero(w_.rows(), w_.cols());
    g_b_.setZero(b_.rows(), b_.cols());
  }

 private:
  Config config_;
  Matrix<S> w_, b_, g_w_, g_b_;
  Embedding<S>* tied_ = nullptr;
};

static_assert(Layer<Linear<float>>);
static_assert(Layer<Linear<double>>);

}  // namespace effattn

#pragma once
// LayerNorm over the features of each token.

#include <cmath>
#include <cstddef>
#include <string_view>

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/activation_meter.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/layer.hpp"

namespace effattn {

/// y = (x − mean(x)) / sqrt(var(x) + eps) · gamma + beta, per token (row), with the biased
/// variance (as PyTorch's LayerNorm). gamma starts at 1 and beta at 0. A training forward
/// keeps each row's mean and 1/σ (2 scalars per token); backward recomputes x̂ from x.
template <class S = float>
class LayerNorm {
 public:
  using Scalar = S;
  static constexpr bool position_wise = true;
  static constexpr std::string_view parameter_group = "norm";

  struct Config {
    Index d_model = 512;  ///< the width normalised
    double eps = 1e-5;
  };

  explicit LayerNorm(Config config) : config_(config) {
    detail::require(config.d_model > 0, "LayerNorm", "d_model", config.d_model, "at least 1");
    detail::require(config.eps >= 0, "LayerNorm", "eps", config.eps, "a value ≥ 0");
    gamma_.setOnes(1, config.d_model);
    beta_.setZero(1, config.d_model);
    zero_grad();
  }

  Index d_in() const { return config_.d_model; }
  Index d_out() const { return config_.d_model; }
  const Config& config() const { return config_; }

  void set_training(bool on) {
    training_ = on;
    if (!on) release_activations();
  }
  bool training() const { return training_; }
  void release_activations() {
    mean_.resize(0, 0);
    inv_std_.resize(0, 0);
    held_.set(0);
  }
  std::size_t activation_bytes() const {
    return sizeof(S) * static_cast<std::size_t>(mean_.size() + inv_std_.size());
  }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_call("LayerNorm", x, d_in(), "y", y, d_out(), shape);
    if (training_) {
      mean_.resize(x.rows(), 1);
      inv_std_.resize(x.rows(), 1);
    }
    for (Index t = 0; t < x.rows(); ++t) {
      const S mean = x.row(t).mean();
      const S inv_std =
          S(1) / std::sqrt((x.row(t).array() - mean).square().mean() + S(config_.eps));
      y.row(t) =
          ((x.row(t).array() - mean) * inv_std * gamma_.row(0).array() + beta_.row(0).array())
              .matrix();
      if (training_) {
        mean_(t, 0) = mean;
        inv_std_(t, 0) = inv_std;
      }
    }
    held_.set(activation_bytes());
  }

  /// dx = (1/σ)(g − mean(g) − x̂·mean(g ⊙ x̂)) with g = dy ⊙ gamma.
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("LayerNorm", x, d_in(), dy, d_out(), dx, shape);
    check_call(shape, true);
    for (Index t = 0; t < x.rows(); ++t) {
      const auto x_hat = (x.row(t).array() - mean_(t, 0)) * inv_std_(t, 0);
      const auto g = dy.row(t).array() * gamma_.row(0).array();
      const S g_mean = g.mean(), gx_mean = (g * x_hat).mean();
      dx.row(t) = (inv_std_(t, 0) * (g - g_mean - x_hat * gx_mean)).matrix();
    }
    shape.for_each_valid_run([&](Index r0, Index rows) {  // padded rows reach no gradient
      for (Index t = r0; t < r0 + rows; ++t) {
        const auto x_hat = (x.row(t).array() - mean_(t, 0)) * inv_std_(t, 0);
        g_gamma_.row(0).array() += dy.row(t).array() * x_hat;
        g_beta_.row(0) += dy.row(t);
      }
    });
  }

  /// Backward needs the statistics of a training forward on as many tokens.
  void check_call(const SequenceShape& shape, bool backward) const {
    if (backward) detail::require_forward(training_ && mean_.rows() == shape.tokens(), "LayerNorm");
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("gamma"), gamma_, g_gamma_);
    f(std::string_view("beta"), beta_, g_beta_);
  }
  void zero_grad() {
    g_gamma_.setZero(1, config_.d_model);
    g_beta_.setZero(1, config_.d_model);
  }

 private:
  Config config_;
  Matrix<S> gamma_, beta_, g_gamma_, g_beta_;
  Matrix<S> mean_, inv_std_;  // tokens × 1, kept by a training forward
  HeldActivations held_;
  bool training_ = false;
};

}  // namespace effattn

#pragma once
// The position-wise feed-forward layer of a transformer block.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numbers>
#include <string_view>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/layers/activation.hpp"
#include "effattn/layers/activation_meter.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/gradients.hpp"
#include "effattn/layers/layer.hpp"
#include "effattn/layers/layer_workspace.hpp"

namespace effattn {

/// FFN(x) = act(x W_1 + b_1) W_2 + b_2 (docs/algorithms.md §6), W_1: d_model × d_ff, W_2:
/// d_ff × d_model; weights N(0, 1/fan_in) from the seed, biases 0. The hidden activation
/// (tokens × d_ff) comes from the calling thread's layer_workspace(), except in a training
/// forward, which keeps the pre-activation for backward. Wrap it in Chunked to bound that
/// hidden width to c tokens at a time.
template <class S = float>
class FeedForward {
 public:
  using Scalar = S;
  static constexpr bool position_wise = true;
  static constexpr std::string_view parameter_group = "feed_forward";

  struct Config {
    Index d_model = 512;
    Index d_ff = 0;  ///< hidden width; 0: 4·d_model
    Activation activation = Activation::gelu;
    bool bias = true;
    std::uint64_t seed = 0;
  };

  explicit FeedForward(Config config) : config_(resolve(config)) {
    const Index d = config_.d_model, h = config_.d_ff;
    w1_.resize(d, h);
    w2_.resize(h, d);
    CounterRng(config_.seed, 1).fill_normal(w1_, 1.0 / std::sqrt(double(d)));
    CounterRng(config_.seed, 2).fill_normal(w2_, 1.0 / std::sqrt(double(h)));
    if (config_.bias) {
      b1_.setZero(1, h);
      b2_.setZero(1, d);
    }
    zero_grad();
  }

  Index d_in() const { return config_.d_model; }
  Index d_out() const { return config_.d_model; }
  Index d_ff() const { return config_.d_ff; }
  const Config& config() const { return config_; }

  void set_training(bool on) {
    training_ = on;
    if (!on) release_activations();
  }
  bool training() const { return training_; }
  void release_activations() {
    pre_.resize(0, 0);
    held_.set(0);
  }
  std::size_t activation_bytes() const { return sizeof(S) * static_cast<std::size_t>(pre_.size()); }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_call("FeedForward", x, d_in(), "y", y, d_out(), shape);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    if (training_) {
      pre_.resize(x.rows(), d_ff());
      project(x, w1_, b1_, pre_);
      auto a = ws.matrix<S>(x.rows(), d_ff());
      activate(pre_, a);
      project(a, w2_, b2_, y);
    } else {
      auto h = ws.matrix<S>(x.rows(), d_ff());
      project(x, w1_, b1_, h);
      activate(h, h);
      project(h, w2_, b2_, y);
    }
    held_.set(activation_bytes());
  }

  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("FeedForward", x, d_in(), dy, d_out(), dx, shape);
    check_call(shape, true);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    auto a = ws.matrix<S>(x.rows(), d_ff());
    activate(pre_, a);
    detail::add_weight_gradient(g_w2_, a, dy, shape);
    if (config_.bias) detail::add_bias_gradient(g_b2_, dy, shape);
    a.noalias() = dy * w2_.transpose();  // d act, then d pre in place
    if (config_.activation == Activation::relu)
      a = (pre_.array() > S(0)).select(a.array(), S(0)).matrix();
    else
      gelu_backward(a, ws);
    detail::add_weight_gradient(g_w1_, x, a, shape);
    if (config_.bias) detail::add_bias_gradient(g_b1_, a, shape);
    dx.noalias() = a * w1_.transpose();
  }

  /// Backward needs the pre-activation of a training forward on as many tokens.
  void check_call(const SequenceShape& shape, bool backward) const {
    if (backward)
      detail::require_forward(training_ && pre_.rows() == shape.tokens(), "FeedForward");
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("w_1"), w1_, g_w1_);
    f(std::string_view("w_2"), w2_, g_w2_);
    if (config_.bias) {
      f(std::string_view("b_1"), b1_, g_b1_);
      f(std::string_view("b_2"), b2_, g_b2_);
    }
  }
  void zero_grad() {
    for (auto [w, g] : {std::pair{&w1_, &g_w1_}, {&w2_, &g_w2_}, {&b1_, &g_b1_}, {&b2_, &g_b2_}})
      g->setZero(w->rows(), w->cols());
  }

 private:
  static Config resolve(Config c) {
    detail::require(c.d_model > 0, "FeedForward", "d_model", c.d_model, "at least 1");
    if (c.d_ff == 0) c.d_ff = 4 * c.d_model;
    detail::require(c.d_ff > 0, "FeedForward", "d_ff", c.d_ff, "at least 1 (or 0 for 4·d_model)");
    return c;
  }

  template <class In>
  void project(const In& in, const Matrix<S>& w, const Matrix<S>& b, View<S> out) const {
    out.noalias() = in * w;
    if (config_.bias) out.rowwise() += b.row(0);
  }

  static constexpr S gelu_c = S(0.7978845608028654);  // √(2/π)
  static constexpr S gelu_a = S(0.044715);

  template <class In, class Out>
  void activate(const In& h, Out& a) const {
    if (config_.activation == Activation::relu) {
      a = h.cwiseMax(S(0));
      return;
    }
    const auto x = h.array();
    a = (S(0.5) * x * (S(1) + (gelu_c * (x + gelu_a * x.cube())).tanh())).matrix();
  }
  // a ⊙= gelu'(pre), a row at a time through one d_ff-wide row of scratch.
  template <class A>
  void gelu_backward(A& a, Workspace& ws) const {
    Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>, Eigen::Aligned64> t(ws.take<S>(d_ff()), d_ff());
    for (Index r = 0; r < a.rows(); ++r) {
      const auto x = pre_.row(r).array();
      t = (gelu_c * (x + gelu_a * x.cube())).tanh();
      a.row(r).array() *= S(0.5) * (S(1) + t) + S(0.5) * x * (S(1) - t.square()) * gelu_c *
                                                    (S(1) + S(3) * gelu_a * x.square());
    }
  }

  Config config_;
  Matrix<S> w1_, w2_, b1_, b2_, g_w1_, g_w2_, g_b1_, g_b2_;
  Matrix<S> pre_;  // tokens × d_ff pre-activation, kept by a training forward
  HeldActivations held_;
  bool training_ = false;
};

}  // namespace effattn

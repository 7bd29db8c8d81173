#pragma once
// Sgd: stochastic gradient descent with momentum (PyTorch's torch.optim.SGD).

#include <cmath>
#include <cstddef>
#include <string_view>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"
#include "effattn/training/detail/parameter_states.hpp"

namespace effattn {

/// Stochastic gradient descent, step for step as torch.optim.SGD: with g = ∇w + λ·w,
///   momentum μ = 0:  w ← w − lr·g
///   μ > 0:           b ← g on a parameter's first step, else b ← μ·b + (1 − dampening)·g;
///                    w ← w − lr·b, or w − lr·(g + μ·b) with `nesterov`.
/// step(models…) updates every parameter that the models' visit_parameters passes, and keys
/// the momentum buffers by parameter path (layers/parameter_paths.hpp), so one optimiser
/// serves a model for its whole training and a parameter keeps its buffer however the model
/// is visited. A step that would fail (a gradient shaped unlike its parameter, a path seen
/// twice, a parameter shaped unlike its buffer) throws effattn::Error and changes nothing.
template <class S = float>
class Sgd : public detail::OptimizerState<S> {
 public:
  using Scalar = S;
  struct Config {
    double lr = 1e-2;
    double momentum = 0;
    double dampening = 0;
    bool nesterov = false;
    double weight_decay = 0;  ///< λ: L2 penalty, added to the gradient
  };

  explicit Sgd(Config config)
      : detail::OptimizerState<S>("Sgd", config.momentum != 0 ? 1 : 0), config_(config) {
    constexpr const char* who = "Sgd";
    detail::require_learning_rate(who, config.lr);
    detail::require(std::isfinite(config.momentum) && config.momentum >= 0, who, "momentum",
                    config.momentum, "a finite value ≥ 0");
    detail::require(
        std::isfinite(config.dampening) && config.dampening >= 0 && config.dampening <= 1, who,
        "dampening", config.dampening, "a value in [0, 1]");
    detail::require(!config.nesterov || (config.momentum > 0 && config.dampening == 0), who,
                    "nesterov", "true",
                    "momentum > 0 and dampening = 0 with Nesterov momentum (as PyTorch)");
    detail::require(std::isfinite(config.weight_decay) && config.weight_decay >= 0, who,
                    "weight_decay", config.weight_decay, "a finite value ≥ 0");
  }

  const Config& config() const { return config_; }
  /// The state kept per parameter: the momentum buffer (none without momentum).
  std::vector<std::string_view> slot_names() const {
    return config_.momentum != 0 ? std::vector<std::string_view>{"momentum"}
                                 : std::vector<std::string_view>{};
  }
  double lr() const { return config_.lr; }
  /// Sets the learning rate (for schedules, see training/schedules.hpp).
  void set_lr(double lr) {
    detail::require_learning_rate("Sgd", lr);
    config_.lr = lr;
  }

  /// One update of every parameter of `models`.
  template <class... Models>
  void step(Models&... models) {
    const auto params = detail::step_parameters<S>("Sgd", models...);
    const auto entries = this->states_.entries(params);
    const S lr = S(config_.lr), mu = S(config_.momentum), damp = S(1 - config_.dampening);
    const S wd = S(config_.weight_decay);
    for (std::size_t i = 0; i < params.size(); ++i) {
      auto w = params[i].value->array();
      auto g = params[i].gradient->array();
      auto& e = *entries[i];
      if (mu == S(0)) {
        if (wd != S(0))
          w -= lr * (g + wd * w);
        else
          w -= lr * g;
      } else {
        auto b = e.slots[0].array();
        if (e.steps == 0)
          b = g + wd * w;
        else
          b = mu * b + damp * (g + wd * w);
        if (config_.nesterov)
          w -= lr * (g + wd * w + mu * b);
        else
          w -= lr * b;
      }
      ++e.steps;
    }
  }

 private:
  Config config_;
};

}  // namespace effattn

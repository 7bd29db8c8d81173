#pragma once
// Adam (Kingma & Ba 2015), with L2 or decoupled weight decay: torch.optim.Adam and AdamW.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"
#include "effattn/training/detail/parameter_states.hpp"

namespace effattn {

/// Adam, step for step as torch.optim.Adam (and, with `decoupled_weight_decay`, AdamW): for
/// a parameter's t-th step with gradient g,
///   L2 decay (Adam):         g ← g + λ·w
///   decoupled (AdamW):       w ← w − lr·λ·w
///   m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
///   w ← w − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + ε)
/// The moments m, v and the step count t are kept per parameter path
/// (layers/parameter_paths.hpp), so a parameter first stepped later gets its own bias
/// correction. A step that would fail (a gradient shaped unlike its parameter, a path seen
/// twice, a parameter shaped unlike its state, a NaN or ∞ gradient) throws effattn::Error and
/// changes nothing. For a finite gradient the update is finite, however large.
template <class S = float>
class Adam : public detail::OptimizerState<S> {
 public:
  using Scalar = S;
  struct Config {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0;              ///< λ
    bool decoupled_weight_decay = false;  ///< AdamW's decay (Loshchilov & Hutter 2019)
  };

  explicit Adam(Config config) : Adam(config, "Adam") {}

  const Config& config() const { return config_; }
  /// The state kept per parameter: the first and second moments, as PyTorch names them.
  std::vector<std::string_view> slot_names() const { return {"exp_avg", "exp_avg_sq"}; }
  double lr() const { return config_.lr; }
  /// Sets the learning rate (for schedules, see training/schedules.hpp).
  void set_lr(double lr) {
    detail::require_learning_rate(this->who_, lr);
    config_.lr = lr;
  }

  /// One update of every parameter of `models`.
  template <class... Models>
  void step(Models&... models) {
    const auto params = detail::step_parameters<S>(this->who_, models...);
    const auto entries = this->states_.entries(params);
    const double b1 = config_.beta1, b2 = config_.beta2;
    const S lr = S(config_.lr), wd = S(config_.weight_decay), eps = S(config_.eps);
    for (std::size_t i = 0; i < params.size(); ++i) {
      auto w = params[i].value->array();
      auto g = params[i].gradient->array();
      auto& e = *entries[i];
      auto m = e.slots[0].array();
      auto v = e.slots[1].array();
      const std::int64_t t = ++e.steps;
      const S step_size = S(config_.lr / (1 - std::pow(b1, double(t))));
      const S root_correction = S(1 / std::sqrt(1 - std::pow(b2, double(t))));
      // v is kept at most the largest finite value: a finite gradient ≥ √max (1.8e19 in
      // float) squares to ∞, and some vectorised square roots turn ∞ into NaN. The update
      // stays finite on every build (PyTorch keeps ∞ there, and its step is then 0).
      constexpr S largest = std::numeric_limits<S>::max();
      if (config_.decoupled_weight_decay) {
        if (wd != S(0)) w *= S(1) - lr * wd;
        m = S(b1) * m + S(1 - b1) * g;
        v = (S(b2) * v + S(1 - b2) * g.square()).min(largest);
      } else {
        m = S(b1) * m + S(1 - b1) * (g + wd * w);
        v = (S(b2) * v + S(1 - b2) * (g + wd * w).square()).min(largest);
      }
      w -= step_size * m / (v.sqrt() * root_correction + eps);
    }
  }

 protected:
  Adam(Config config, const char* who) : detail::OptimizerState<S>(who, 2), config_(config) {
    detail::require_learning_rate(who, config.lr);
    detail::require(config.beta1 >= 0 && config.beta1 < 1, who, "beta1", config.beta1,
                    "a value in [0, 1)");
    detail::require(config.beta2 >= 0 && config.beta2 < 1, who, "beta2", config.beta2,
                    "a value in [0, 1)");
    detail::require(std::isfinite(config.eps) && config.eps > 0, who, "eps", config.eps,
                    "a finite value > 0");
    detail::require(std::isfinite(config.weight_decay) && config.weight_decay >= 0, who,
                    "weight_decay", config.weight_decay, "a finite value ≥ 0");
  }

 private:
  Config config_;
};

}  // namespace effattn

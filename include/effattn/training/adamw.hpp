#pragma once
// AdamW: Adam with decoupled weight decay, with torch.optim.AdamW's defaults.

#include "effattn/training/adam.hpp"

namespace effattn {

/// Adam with decoupled weight decay (Loshchilov & Hutter 2019): w ← w − lr·λ·w before the
/// Adam update, instead of adding λ·w to the gradient. Defaults as torch.optim.AdamW
/// (λ = 0.01). Everything else is Adam's (training/adam.hpp).
template <class S = float>
class AdamW : public Adam<S> {
 public:
  struct Config {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 1e-2;  ///< λ
  };

  explicit AdamW(Config c)
      : Adam<S>({.lr = c.lr,
                 .beta1 = c.beta1,
                 .beta2 = c.beta2,
                 .eps = c.eps,
                 .weight_decay = c.weight_decay,
                 .decoupled_weight_decay = true},
                "AdamW") {}
};

}  // namespace effattn

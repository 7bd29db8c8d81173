#pragma once
// clip_grad_norm: scales all gradients of a step together so their global norm is at most a
// bound (torch.nn.utils.clip_grad_norm_).

#include <cmath>
#include <string_view>
#include <type_traits>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

/// The global L2 norm of every gradient of `models` (anything with visit_parameters(f)),
/// summed in double.
template <class... Models>
double grad_norm(Models&... models) {
  double sum = 0;
  auto add = [&](std::string_view, auto&, auto& gradient) {
    sum += gradient.template cast<double>().squaredNorm();
  };
  (models.visit_parameters(add), ...);
  return std::sqrt(sum);
}

/// Scales every gradient of `models` by max_norm / (norm + 1e-6) when their global norm
/// exceeds max_norm, as torch.nn.utils.clip_grad_norm_, and returns the norm before
/// clipping. A non-finite norm (a NaN or ∞ gradient) is returned and the gradients are left
/// as they are: the caller should skip that step (scaling would spread the NaN to all).
template <class... Models>
double clip_grad_norm(double max_norm, Models&... models) {
  detail::require(std::isfinite(max_norm) && max_norm > 0, "clip_grad_norm", "max_norm", max_norm,
                  "a finite norm > 0");
  const double norm = grad_norm(models...);
  if (!std::isfinite(norm)) return norm;
  const double factor = max_norm / (norm + 1e-6);
  if (factor < 1) {
    auto scale = [&](std::string_view, auto&, auto& gradient) {
      using S = typename std::decay_t<decltype(gradient)>::Scalar;
      gradient *= S(factor);
    };
    (models.visit_parameters(scale), ...);
  }
  return norm;
}

}  // namespace effattn

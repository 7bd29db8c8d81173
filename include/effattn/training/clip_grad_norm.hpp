#pragma once
// clip_grad_norm: scales all gradients of a step together so their global norm is at most a
// bound (torch.nn.utils.clip_grad_norm_).

#include <cmath>
#include <string>
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

/// clip_grad_norm's options.
struct ClipGradNorm {
  double max_norm = 1.0;
  /// A NaN or ∞ norm is an effattn::Error instead of a return value.
  bool error_if_nonfinite = false;
};

template <class... Models>
double clip_grad_norm(const ClipGradNorm& options, Models&... models);

/// Scales every gradient of `models` by max_norm / (norm + 1e-6) when their global norm
/// exceeds max_norm, as torch.nn.utils.clip_grad_norm_, and returns the norm before
/// clipping. A non-finite norm (a NaN or ∞ gradient) is returned and the gradients are left
/// as they are: the caller should skip that step (scaling would spread the NaN to all; optimisers
/// refuse a non-finite gradient with an effattn::Error).
template <class... Models>
double clip_grad_norm(double max_norm, Models&... models) {
  return clip_grad_norm(ClipGradNorm{.max_norm = max_norm}, models...);
}

/// clip_grad_norm with its options; with error_if_nonfinite (as PyTorch's), a NaN or ∞ norm
/// is an effattn::Error naming the first parameter whose gradient is not finite, and nothing
/// changes.
template <class... Models>
double clip_grad_norm(const ClipGradNorm& options, Models&... models) {
  const double max_norm = options.max_norm;
  detail::require(std::isfinite(max_norm) && max_norm > 0, "clip_grad_norm", "max_norm", max_norm,
                  "a finite norm > 0");
  const double norm = grad_norm(models...);
  if (!std::isfinite(norm) && options.error_if_nonfinite) {
    std::string first;
    auto find = [&](std::string_view path, auto&, auto& gradient) {
      if (first.empty() && !gradient.allFinite()) first = path;
    };
    (models.visit_parameters(find), ...);
    detail::require(false, "clip_grad_norm", first.empty() ? "gradients" : "gradient of " + first,
                    detail::concat("of norm ", norm), "finite gradients (error_if_nonfinite)");
  }
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

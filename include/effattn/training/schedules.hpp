#pragma once
// Learning-rate schedules as plain functions of the step: multiply the peak rate by them and
// pass the product to an optimiser's set_lr.
//
// `step` counts the optimiser steps already taken (0 for the first). Warm-up rises linearly
// over `warmup` steps, (step + 1) / warmup, so the first step already moves and step
// warmup − 1 runs at the full rate; warmup = 0 starts at the full rate. After it:
//   linear_decay:  falls linearly to 0 at step `total`
//   cosine_decay:  falls along half a cosine to `floor` at step `total`
//   inverse_sqrt:  √(warmup / (step + 1)), the Transformer's (Vaswani et al. 2017) decay
// Steps past `total` keep the final value.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "effattn/core/error.hpp"

namespace effattn {

namespace detail {
inline void require_schedule(const char* who, std::int64_t step, std::int64_t warmup) {
  require(step >= 0, who, "step", step, "a step count ≥ 0");
  require(warmup >= 0, who, "warmup", warmup, "a step count ≥ 0");
}
inline void require_total(const char* who, std::int64_t warmup, std::int64_t total) {
  require(total > warmup, who, "total", total,
          concat("more steps than the warm-up (", warmup, ")"));
}
// Warm-up's factor, or −1 past it.
inline double warmup_factor(std::int64_t step, std::int64_t warmup) {
  return step < warmup ? double(step + 1) / double(warmup) : -1.0;
}
}  // namespace detail

/// Linear warm-up, then linear decay to 0 at step `total`.
inline double linear_decay(std::int64_t step, std::int64_t warmup, std::int64_t total) {
  detail::require_schedule("linear_decay", step, warmup);
  detail::require_total("linear_decay", warmup, total);
  if (const double w = detail::warmup_factor(step, warmup); w >= 0) return w;
  return std::max(0.0, double(total - step) / double(total - warmup));
}

/// Linear warm-up, then half a cosine from 1 down to `floor` (in [0, 1]) at step `total`.
inline double cosine_decay(std::int64_t step, std::int64_t warmup, std::int64_t total,
                           double floor = 0) {
  detail::require_schedule("cosine_decay", step, warmup);
  detail::require_total("cosine_decay", warmup, total);
  detail::require(floor >= 0 && floor <= 1, "cosine_decay", "floor", floor, "a value in [0, 1]");
  if (const double w = detail::warmup_factor(step, warmup); w >= 0) return w;
  const double progress = std::min(1.0, double(step - warmup) / double(total - warmup));
  return floor + (1 - floor) * 0.5 * (1 + std::cos(std::numbers::pi * progress));
}

/// Linear warm-up, then √(warmup / (step + 1)) (1 at the end of warm-up; with warmup = 0,
/// 1/√(step + 1)).
inline double inverse_sqrt(std::int64_t step, std::int64_t warmup) {
  detail::require_schedule("inverse_sqrt", step, warmup);
  if (const double w = detail::warmup_factor(step, warmup); w >= 0) return w;
  return std::sqrt(double(std::max<std::int64_t>(warmup, 1)) / (double(step) + 1));  // no overflow
}

}  // namespace effattn

#pragma once
// The FeatureMap concept: what a feature map φ for kernelised attention (Performer,
// docs/algorithms.md §2) provides, so that Favor<S, Map> can use it.
//
// Every map works on one row at a time, from the row's projections z = W x (m values, W the
// random features) and half its squared norm h = ‖x‖²/2, and has three static functions:
//   log_max(z, m, h)                      the log of the row's largest feature before the
//                                         1/√m factor: what the stabiliser subtracts
//   apply(z, m, h, shift, phi)            phi = φ(x)·exp(−shift), width·m values
//   backward(z, m, h, phi, d_phi, d_z)    d_z (m values) from d_phi; returns dL/dh
// The shift is the FAVOR+ stabiliser: queries use their own row's log_max, keys one value
// at least as large as every key's; it cancels in attention's normalisation. apply needs
// shift ≥ log_max (every exponent ≤ 0, so exp never overflows). Maps that are not built on
// exp ignore the shift and report log_max 0.

#include <concepts>

#include "effattn/core/types.hpp"

namespace effattn {

/// A feature map: `name`, `width` (features per random direction), `estimates_softmax`
/// (whether φ(x)·φ(y) estimates exp(x·y), which decides the input scaling and the
/// stabiliser), `default_epsilon`, and the three row functions above for S = float and double.
template <class M>
concept FeatureMap = requires(const float* zf, float* pf, const double* zd, double* pd, Index m) {
  { M::name } -> std::convertible_to<const char*>;
  { M::width } -> std::convertible_to<Index>;
  { M::estimates_softmax } -> std::convertible_to<bool>;
  { M::default_epsilon } -> std::convertible_to<double>;
  { M::log_max(zf, m, 0.0f) } -> std::same_as<float>;
  M::apply(zf, m, 0.0f, 0.0f, pf);
  { M::backward(zf, m, 0.0f, zf, zf, pf) } -> std::same_as<float>;
  { M::log_max(zd, m, 0.0) } -> std::same_as<double>;
  M::apply(zd, m, 0.0, 0.0, pd);
  { M::backward(zd, m, 0.0, zd, zd, pd) } -> std::same_as<double>;
};

namespace detail {
template <class S>
void scale_in_place(S* v, Index n, S factor) {
  for (Index j = 0; j < n; ++j)
    v[j] *= factor;
}
}  // namespace detail

}  // namespace effattn

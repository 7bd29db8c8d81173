#pragma once
// Native-width SIMD for the kernels: a float vector as wide as the target's registers
// (GCC/Clang vector extensions), loads and stores, reductions, and the exp the softmax uses.
//
// The width comes from the flags the user compiles with (-mavx512f: 16 lanes, -mavx: 8,
// otherwise 4): the library never adds -march=native. A wider type than the registers (16
// lanes on an AVX2 machine) would be split into halves by the compiler, with selects and
// round trips through memory; a native one maps each operation to one instruction.

#include <cstdint>
#include <cstring>
#include <utility>

namespace effattn::detail::simd {

#if defined(__GNUC__)
inline constexpr bool enabled = true;
#if defined(__AVX512F__)
inline constexpr int width = 16;
#elif defined(__AVX__)
inline constexpr int width = 8;
#else
inline constexpr int width = 4;
#endif
using Vec = float __attribute__((vector_size(width * sizeof(float))));
using IVec = std::int32_t __attribute__((vector_size(width * sizeof(float))));

/// Unaligned load and store (memcpy compiles to one vector move).
[[gnu::always_inline]] inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
[[gnu::always_inline]] inline void store(float* p, Vec v) {
  std::memcpy(p, &v, sizeof v);
}
[[gnu::always_inline]] inline Vec broadcast(float x) {
  return Vec{} + x;
}

/// v with its upper `half` lanes brought down: lane i of the result is lane i % half + half.
template <int Half, int... I>
[[gnu::always_inline]] inline Vec upper(Vec v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, (I % Half + Half)...);
}
/// Folds the lanes with op by halving (log2(width) shuffles, no scalar loop).
template <class Op>
[[gnu::always_inline]] inline float fold(Vec v, Op op) {
  constexpr auto lanes = std::make_integer_sequence<int, width>{};
  if constexpr (width >= 16) v = op(v, upper<8>(v, lanes));
  if constexpr (width >= 8) v = op(v, upper<4>(v, lanes));
  if constexpr (width >= 4) v = op(v, upper<2>(v, lanes));
  if constexpr (width >= 2) v = op(v, upper<1>(v, lanes));
  return v[0];
}
[[gnu::always_inline]] inline float sum(Vec v) {
  return fold(v, [](Vec a, Vec b) { return a + b; });
}

/// exp(x) for x ≤ 0: Cody–Waite reduction x = k·ln2 + r, |r| ≤ ln2/2, then a degree-6
/// polynomial (relative error < 3e-7 over the range softmax uses). x below −87 (including −∞,
/// a masked logit) gives exactly 0; NaN stays NaN. About 15 instructions per vector.
[[gnu::always_inline]] inline Vec exp_nonpositive(Vec x) {
  constexpr float lo = -87.0f, log2e = 1.44269504088896341f;
  constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  const Vec xc = x > lo ? x : lo;  // also maps NaN to lo, so the int conversion is defined
  const IVec k = __builtin_convertvector(xc * log2e - 0.5f, IVec);  // round(x/ln2), x ≤ 0
  const Vec kf = __builtin_convertvector(k, Vec);
  const Vec r = (xc - kf * ln2_hi) - kf * ln2_lo;
  Vec p = r * (1.0f / 720) + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  Vec e = reinterpret_cast<Vec>(reinterpret_cast<IVec>(p) + (k << 23));
  e = x < lo ? 0.0f : e;
  return x != x ? x : e;
}
#else
inline constexpr bool enabled = false;
inline constexpr int width = 1;
#endif

}  // namespace effattn::detail::simd

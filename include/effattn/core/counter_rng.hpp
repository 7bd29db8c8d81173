#pragma once
// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
//
// A value is a pure function of (seed, stream, index): no state is carried between
// draws, so filling a matrix in parallel, in any order, on any number of threads gives
// the same numbers as filling it serially. The integer stream is bit-exact on every
// platform (it is checked against the Random123 known-answer vectors). Gaussians are
// made from it by the Box–Muller transform in double precision, so they are as portable
// as the platform's std::log / std::cos / std::sin (identical wherever those are
// correctly rounded, as in glibc; at most an ulp apart elsewhere).

#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "effattn/core/types.hpp"

namespace effattn {

namespace detail {

inline std::array<std::uint32_t, 4> philox_round(std::array<std::uint32_t, 4> c,
                                                 std::array<std::uint32_t, 2> k) {
  constexpr std::uint64_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
  const std::uint64_t p0 = m0 * c[0], p1 = m1 * c[2];
  const auto hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
  const auto hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
  return {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
}

}  // namespace detail

/// Philox4x32 with 10 rounds: 128-bit counter and 64-bit key in, 128 random bits out.
inline std::array<std::uint32_t, 4> philox4x32(std::array<std::uint32_t, 4> counter,
                                               std::array<std::uint32_t, 2> key) {
  constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key[0] += w0;
      key[1] += w1;
    }
    counter = detail::philox_round(counter, key);
  }
  return counter;
}

/// Random numbers addressed by (seed, stream, index). `stream` separates independent
/// uses under one seed (e.g. one per weight matrix); `index` is the position within it.
class CounterRng {
 public:
  explicit CounterRng(std::uint64_t seed, std::uint64_t stream = 0)
      : seed_(seed), stream_(stream) {}

  std::uint64_t seed() const { return seed_; }
  std::uint64_t stream() const { return stream_; }

  /// 128 random bits for block `block` of this stream.
  std::array<std::uint32_t, 4> bits(std::uint64_t block) const {
    return philox4x32(
        {static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
         static_cast<std::uint32_t>(stream_), static_cast<std::uint32_t>(stream_ >> 32)},
        {static_cast<std::uint32_t>(seed_), static_cast<std::uint32_t>(seed_ >> 32)});
  }

  /// Uniform double in the open interval (0, 1): 53 random bits, offset by half a step
  /// so log() in Box–Muller never sees 0.
  double uniform(std::uint64_t index) const {
    const auto b = bits(index / 2);
    const std::size_t half = 2 * static_cast<std::size_t>(index % 2);
    return to_unit(b[half], b[half + 1]);
  }

  /// Standard normal N(0, 1); values 2i and 2i+1 are the Box–Muller pair of block i.
  double normal(std::uint64_t index) const {
    const auto b = bits(index / 2);
    const double u1 = to_unit(b[0], b[1]), u2 = to_unit(b[2], b[3]);
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 2.0 * std::numbers::pi * u2;
    return index % 2 == 0 ? radius * std::cos(angle) : radius * std::sin(angle);
  }

  /// Fills `m` (row-major order of its elements) with N(0, stddev²) values starting at
  /// `first_index`.
  template <class Derived>
  void fill_normal(Eigen::MatrixBase<Derived>& m, double stddev = 1.0,
                   std::uint64_t first_index = 0) const {
    using S = typename Derived::Scalar;
    std::uint64_t i = first_index;
    for (Index r = 0; r < m.rows(); ++r)
      for (Index c = 0; c < m.cols(); ++c)
        m(r, c) = static_cast<S>(stddev * normal(i++));
  }

  /// Fills `m` with values uniform in (lo, hi).
  template <class Derived>
  void fill_uniform(Eigen::MatrixBase<Derived>& m, double lo, double hi,
                    std::uint64_t first_index = 0) const {
    using S = typename Derived::Scalar;
    std::uint64_t i = first_index;
    for (Index r = 0; r < m.rows(); ++r)
      for (Index c = 0; c < m.cols(); ++c)
        m(r, c) = static_cast<S>(lo + (hi - lo) * uniform(i++));
  }

 private:
  static double to_unit(std::uint32_t hi, std::uint32_t lo) {
    const std::uint64_t x = ((static_cast<std::uint64_t>(hi) << 32) | lo) >> 11;  // 53 bits
    return (static_cast<double>(x) + 0.5) * 0x1.0p-53;
  }

  std::uint64_t seed_;
  std::uint64_t stream_;
};

}  // namespace effattn

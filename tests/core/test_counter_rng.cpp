// CounterRng and Philox4x32-10: known answers, independence of (seed, stream, index), moments.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"

using namespace effattn;

TEST_CASE("Philox4x32-10 reproduces the Random123 known-answer vectors", "[core][rng]") {
  // Published test vectors (Random123 kat_vectors): counter, key -> output.
  CHECK(philox4x32({0, 0, 0, 0}, {0, 0}) ==
        std::array<std::uint32_t, 4>{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8});
  CHECK(philox4x32({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}) ==
        std::array<std::uint32_t, 4>{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd});
  CHECK(philox4x32({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}) ==
        std::array<std::uint32_t, 4>{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1});
}

TEST_CASE("CounterRng: a value depends only on (seed, stream, index)", "[core][rng]") {
  const CounterRng a(42, 3), b(42, 3), other_seed(43, 3), other_stream(42, 4);
  for (std::uint64_t i = 0; i < 100; ++i) {
    CHECK(a.normal(i) == b.normal(i));
    CHECK(a.uniform(i) == b.uniform(i));
  }
  int same_seed = 0, same_stream = 0;
  for (std::uint64_t i = 0; i < 100; ++i) {
    same_seed += a.normal(i) == other_seed.normal(i);
    same_stream += a.normal(i) == other_stream.normal(i);
  }
  CHECK(same_seed == 0);
  CHECK(same_stream == 0);

  // Filling in parallel, in any order and on any number of threads, gives the serial values.
  Matrix<double> serial(64, 33), parallel(64, 33);
  a.fill_normal(serial);
  parallel_for(parallel.rows(), max_threads(), [&](Index r, int) {
    for (Index c = 0; c < parallel.cols(); ++c)
      parallel(r, c) = a.normal(static_cast<std::uint64_t>(r * parallel.cols() + c));
  });
  CHECK(serial == parallel);
  // An offset fill continues the same sequence.
  Matrix<double> tail(1, 33);
  a.fill_normal(tail, 1.0, 63 * 33);
  CHECK(tail.row(0) == serial.row(63));
}

TEST_CASE("CounterRng: uniform and normal draws have the right moments", "[core][rng]") {
  const CounterRng rng(7);
  constexpr int n = 200000;
  double sum = 0, sum2 = 0, sum4 = 0, usum = 0, umin = 1, umax = 0;
  for (int i = 0; i < n; ++i) {
    const double x = rng.normal(static_cast<std::uint64_t>(i));
    sum += x;
    sum2 += x * x;
    sum4 += x * x * x * x;
    const double u = rng.uniform(static_cast<std::uint64_t>(i));
    usum += u;
    umin = std::min(umin, u);
    umax = std::max(umax, u);
  }
  // Standard errors: mean 1/sqrt(n) ≈ 0.0022, variance sqrt(2/n) ≈ 0.0032, kurtosis ≈ 0.011.
  CHECK(std::abs(sum / n) < 0.012);
  CHECK(std::abs(sum2 / n - 1.0) < 0.016);
  CHECK(std::abs(sum4 / n - 3.0) < 0.08);
  CHECK(std::abs(usum / n - 0.5) < 0.004);  // sd of mean ≈ 0.00065
  CHECK(umin > 0.0);
  CHECK(umax < 1.0);
}

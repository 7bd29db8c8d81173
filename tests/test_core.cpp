// Core: errors, shapes, the counter-based RNG, workspaces, the parallel loop, online softmax.
#include <catch2/catch.hpp>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "effattn/core/aliasing.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/core/workspace_pool.hpp"

using namespace effattn;

TEST_CASE("Error names component, argument, given and expected", "[core][error]") {
  const Error e("Widget", "width", "7", "an even number");
  CHECK(std::string(e.what()) == "effattn: Widget: argument 'width' is 7; expected an even number");
  CHECK(e.component() == "Widget");
  CHECK(e.argument() == "width");
  const std::invalid_argument& base = e;  // catchable as the standard type
  CHECK(std::string(base.what()).rfind("effattn: ", 0) == 0);
  CHECK_NOTHROW(detail::require(true, "W", "a", 1, 2));
  CHECK_THROWS_AS(detail::require(false, "W", "a", 1, 2), Error);
}

TEST_CASE("SequenceShape validation", "[core][shape]") {
  SequenceShape ok{2, 5, {5, 0}};
  CHECK_NOTHROW(ok.validate("T", "x", 10));
  CHECK(ok.valid_length(1) == 0);
  CHECK_THROWS_WITH(ok.validate("T", "x", 9), Catch::Contains("batch·seq = 2·5 = 10 rows"));
  CHECK_THROWS_WITH((SequenceShape{2, 5, {6, 1}}.validate("T", "x", 10)),
                    Catch::Contains("x.lengths[0]") && Catch::Contains("[0, 5]"));
  CHECK_THROWS_WITH((SequenceShape{2, 5, {1}}.validate("T", "x", 10)),
                    Catch::Contains("one length per sequence"));
  CHECK_THROWS_WITH((SequenceShape{0, 5}.validate("T", "x", 0)), Catch::Contains("x.batch"));
  CHECK_THROWS_WITH((SequenceShape{1, 0}.validate("T", "x", 0)), Catch::Contains("x.seq"));
}

TEST_CASE("SequenceShape: batch·seq that overflows Index is an Error, not a wrapped count",
          "[core][shape]") {
  const Index huge = (Index(1) << 61) + 1;  // ·8 wraps to 8
  CHECK_THROWS_WITH((SequenceShape{huge, 8}.validate("T", "x", 8)),
                    Catch::Contains("argument 'x'") && Catch::Contains("overflows"));
  // 2^62·4 wraps to 0, which an empty input would otherwise match.
  CHECK_THROWS_WITH((SequenceShape{Index(1) << 62, 4}.validate("T", "x", 0)),
                    Catch::Contains("overflows"));
  CHECK_THROWS_AS((SequenceShape{huge, 8}.tokens()), Error);
  CHECK(SequenceShape{3, 7}.tokens() == 21);
}

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

TEST_CASE("Workspace: aligned slices, frames, peak and growth accounting", "[core][workspace]") {
  Workspace ws;
  ws.reserve(1024);
  CHECK(ws.total_capacity() >= 1024);
  {
    Workspace::Frame outer(ws);
    float* a = ws.take<float>(3);
    CHECK(reinterpret_cast<std::uintptr_t>(a) % Workspace::alignment == 0);
    CHECK(ws.in_use() == 64);
    {
      Workspace::Frame inner(ws);
      auto m = ws.matrix<double>(4, 5);
      CHECK(reinterpret_cast<std::uintptr_t>(m.data()) % Workspace::alignment == 0);
      CHECK(ws.in_use() == 64 + 192);
    }
    CHECK(ws.in_use() == 64);
    CHECK(ws.peak_bytes() == 256);
  }
  CHECK(ws.in_use() == 0);
  CHECK(ws.growths() == 0);
  {
    Workspace::Frame frame(ws);
    ws.take<float>(1000);  // 4000 bytes: more than planned, so the workspace grows
    CHECK(ws.growths() == 1);
    CHECK(ws.peak_bytes() == 4032);
  }
  ws.reset_peak();
  CHECK(ws.peak_bytes() == 0);
  ws.reserve(8192);  // folds the extra block into one
  CHECK(ws.total_capacity() >= 8192);

  WorkspacePool pool(2);
  pool.reserve_each(128);
  pool[0].take<char>(10);
  pool[1].take<char>(100);
  CHECK(pool.peak_bytes() == 64 + 128);
  CHECK(pool.growths() == 0);
}

TEST_CASE("parallel_for runs every task once and rethrows a task's exception", "[core][parallel]") {
  const int threads = max_threads();
  REQUIRE(threads >= 1);
  std::vector<std::atomic<int>> hits(1000);
  std::atomic<int> bad_slot{0};
  parallel_for(1000, threads, [&](Index i, int slot) {
    hits[static_cast<std::size_t>(i)].fetch_add(1);
    if (slot < 0 || slot >= threads) bad_slot.fetch_add(1);
  });
  for (auto& h : hits)
    CHECK(h.load() == 1);
  CHECK(bad_slot.load() == 0);
  CHECK_THROWS_AS(parallel_for(100, threads,
                               [](Index i, int) {
                                 if (i == 17) throw std::runtime_error("task 17");
                               }),
                  std::runtime_error);
  int calls = 0;
  parallel_for(0, threads, [&](Index, int) { ++calls; });
  CHECK(calls == 0);
}

TEST_CASE("online softmax over tiles equals the softmax of the whole row", "[core][softmax]") {
  Matrix<double> logits(3, 10);
  CounterRng(5).fill_normal(logits, 3.0);
  logits.row(2).setConstant(-std::numeric_limits<double>::infinity());  // fully masked
  double m[3], sum[3], rescale[3];
  std::fill(m, m + 3, -std::numeric_limits<double>::infinity());
  std::fill(sum, sum + 3, 0.0);
  Matrix<double> t1 = logits.leftCols(4), t2 = logits.rightCols(6);
  detail::online_softmax_step(t1, m, sum, rescale);
  detail::online_softmax_step(t2, m, sum, rescale);
  for (int r = 0; r < 2; ++r) {
    const double max = logits.row(r).maxCoeff();
    const double exact = (logits.row(r).array() - max).exp().sum();
    CHECK(m[r] == max);
    CHECK(sum[r] == Approx(exact).epsilon(1e-14));
    CHECK(detail::row_logsumexp(m[r], sum[r]) == Approx(max + std::log(exact)).epsilon(1e-14));
  }
  CHECK(sum[2] == 0.0);
  CHECK(t2.row(2).isZero());
  CHECK(detail::row_logsumexp(m[2], sum[2]) == std::numeric_limits<double>::infinity());
}

TEMPLATE_TEST_CASE("exp_shifted_sum matches std::exp, gives 0 for -inf and keeps NaN",
                   "[core][softmax]", float, double) {
  using S = TestType;
  // 1000 values over the range softmax uses (x - shift <= 0), and a length that is not a
  // multiple of the vector width, so the tail is covered too.
  std::vector<S> x(1000);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = S(-90.0 * double(i) / 999.0 + 2.5);
  std::vector<S> y = x;
  const S sum = detail::exp_shifted_sum(y.data(), Index(y.size()), S(2.5));
  double worst = 0, exact_sum = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double exact = std::exp(double(S(x[i] - S(2.5))));  // the argument rounded as in S
    exact_sum += double(y[i]);
    if (exact > 1e-37) worst = std::max(worst, std::abs(double(y[i]) - exact) / exact);
    CHECK(y[i] >= 0);
  }
  CHECK(worst < (std::is_same_v<S, float> ? 5e-7 : 1e-14));
  CHECK(double(sum) == Approx(exact_sum).epsilon(1e-6));

  std::vector<S> special = {S(0), -std::numeric_limits<S>::infinity(),
                            std::numeric_limits<S>::quiet_NaN(), S(-1000), S(-1)};
  detail::exp_shifted_sum(special.data(), Index(special.size()), S(0));
  CHECK(special[0] == S(1));
  CHECK(special[1] == S(0));
  CHECK(std::isnan(special[2]));
  CHECK(special[3] == S(0));
  CHECK(special[4] == Approx(std::exp(-1.0)).epsilon(1e-6));
}

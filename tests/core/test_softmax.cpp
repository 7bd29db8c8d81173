// The softmax kernels: online softmax over tiles, exp_shifted_sum.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"

using namespace effattn;

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

// Learning-rate schedules: their defining values, continuity at the warm-up's end, errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <numbers>

#include "effattn/core/error.hpp"
#include "effattn/training/schedules.hpp"

using namespace effattn;

TEST_CASE("Warm-up rises linearly from the first step to the full rate", "[training]") {
  for (std::int64_t step = 0; step < 10; ++step) {
    const double expected = double(step + 1) / 10;
    CHECK(linear_decay(step, 10, 100) == Approx(expected));
    CHECK(cosine_decay(step, 10, 100) == Approx(expected));
    CHECK(inverse_sqrt(step, 10) == Approx(expected));
  }
  CHECK(linear_decay(0, 0, 100) == 1.0);  // no warm-up: the full rate at once
  CHECK(cosine_decay(0, 0, 100) == 1.0);
  CHECK(inverse_sqrt(0, 0) == 1.0);
}

TEST_CASE("Decays reach their end values and stay there", "[training]") {
  CHECK(linear_decay(10, 10, 110) == Approx(1.0));
  CHECK(linear_decay(60, 10, 110) == Approx(0.5));
  CHECK(linear_decay(110, 10, 110) == 0.0);
  CHECK(linear_decay(500, 10, 110) == 0.0);
  CHECK(cosine_decay(60, 10, 110) == Approx(0.5));
  CHECK(cosine_decay(35, 10, 110) == Approx(0.5 * (1 + std::cos(std::numbers::pi / 4))));
  CHECK(cosine_decay(110, 10, 110, 0.1) == Approx(0.1));
  CHECK(cosine_decay(900, 10, 110, 0.1) == Approx(0.1));
  CHECK(inverse_sqrt(399, 100) == Approx(0.5));
  CHECK(inverse_sqrt(3, 0) == Approx(0.5));
  // Monotone after warm-up.
  for (std::int64_t s = 10; s < 120; ++s) {
    CHECK(linear_decay(s + 1, 10, 110) <= linear_decay(s, 10, 110));
    CHECK(cosine_decay(s + 1, 10, 110) <= cosine_decay(s, 10, 110));
    CHECK(inverse_sqrt(s + 1, 10) < inverse_sqrt(s, 10));
  }
}

TEST_CASE("Schedules reject steps and lengths out of range", "[training]") {
  CHECK_THROWS_AS(linear_decay(-1, 10, 100), Error);
  CHECK_THROWS_AS(linear_decay(0, 100, 100), Error);  // total must exceed warm-up
  CHECK_THROWS_AS(cosine_decay(0, -1, 100), Error);
  CHECK_THROWS_AS(cosine_decay(0, 1, 100, 1.5), Error);
  CHECK_THROWS_AS(inverse_sqrt(-5, 10), Error);
  try {
    linear_decay(3, 10, 5);
  } catch (const Error& e) {
    CHECK(e.component() == "linear_decay");
    CHECK(e.argument() == "total");
  }
}

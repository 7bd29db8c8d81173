// Duplicate and MergeHalves: entering and leaving the two-half layout of a reversible stack.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

TEST_CASE("Duplicate and MergeHalves enter and leave the two-half layout", "[layers]") {
  const SequenceShape shape{1, 5, {}};
  const Matrix<double> x = random<double>(5, 3, 19);
  Sequential<Duplicate<double>, MergeHalves<double>> mean({.d_model = 3},
                                                          {.d_model = 3, .merge = Merge::mean});
  Sequential<Duplicate<double>, MergeHalves<double>> concat({.d_model = 3}, {.d_model = 3});
  Matrix<double> y(5, 3), y2(5, 6);
  mean.forward(x, y, shape);
  CHECK(y == x);
  concat.forward(x, y2, shape);
  CHECK(y2.leftCols(3) == x);
  CHECK(y2.rightCols(3) == x);
  check_gradients(mean, x, shape);
  check_gradients(concat, x, shape);
}

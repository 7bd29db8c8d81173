// Positional encodings: sinusoidal against its formula, learned and axial against naive
// tables, finite differences, positions per sequence and from an offset, range errors.
#include <catch2/catch.hpp>

#include <cmath>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

TEST_CASE("SinusoidalPositions adds sin/cos of each position within its sequence", "[layers]") {
  SinusoidalPositions<double> pe({.d_model = 5});
  const SequenceShape shape{2, 4, {}};
  const Matrix<double> x = random<double>(8, 5, 1);
  Matrix<double> y(8, 5);
  pe.offset = 3;
  pe.forward(x, y, shape);
  for (Index r = 0; r < 8; ++r)
    for (Index c = 0; c < 5; ++c) {
      const double p = double(3 + r % 4), w = std::pow(10000.0, -double(2 * (c / 2)) / 5.0);
      CHECK(y(r, c) - x(r, c) == Approx(c % 2 ? std::cos(p * w) : std::sin(p * w)).margin(1e-15));
    }
  pe.offset = 0;
  check_gradients(pe, x, shape);
  CHECK(parameter_paths(pe).empty());
}

TEST_CASE("LearnedPositions adds its table's rows and sums their gradients", "[layers]") {
  LearnedPositions<double> pe({.d_model = 3, .max_positions = 6, .seed = 1});
  const SequenceShape shape{2, 4, {}};
  const Matrix<double> x = random<double>(8, 3, 2);
  Matrix<double> y(8, 3);
  pe.offset = 2;
  pe.forward(x, y, shape);
  const MatD table = parameters(pe).at("table");
  for (Index r = 0; r < 8; ++r)
    CHECK((y.row(r) - x.row(r) - table.row(2 + r % 4)).norm() < 1e-15);
  check_gradients(pe, x, shape);
  pe.offset = 3;  // positions 3 … 6: beyond the table
  try {
    pe.forward(x, y, shape);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(e.component() == "LearnedPositions");
    CHECK(e.argument() == "shape.seq");
  }
}

TEST_CASE("AxialPositions equals the concatenated table of its two axes", "[layers]") {
  AxialPositions<double> pe({.d_model = 5, .shape = {3, 4}, .dims = {2, 3}, .seed = 1});
  CHECK(pe.max_positions() == 12);
  const auto p = parameters(pe);
  CHECK(p.at("axis_0").rows() == 3);
  CHECK(p.at("axis_0").cols() == 2);
  CHECK(p.at("axis_1").rows() == 4);
  CHECK(p.at("axis_1").cols() == 3);
  const SequenceShape shape{1, 12, {}};
  const Matrix<double> x = random<double>(12, 5, 2);
  Matrix<double> y(12, 5);
  pe.forward(x, y, shape);
  for (Index pos = 0; pos < 12; ++pos) {  // a full table, built naively
    MatD row(1, 5);
    row << p.at("axis_0").row(pos / 4), p.at("axis_1").row(pos % 4);
    CHECK((y.row(pos) - x.row(pos) - row).norm() < 1e-15);
  }
  check_gradients(pe, x, shape);
  const SequenceShape two{2, 5, {}};
  pe.offset = 7;
  check_gradients(pe, random<double>(10, 5, 3), two);
  pe.offset = 8;
  Matrix<double> y2(10, 5);
  CHECK_THROWS_AS(pe.forward(random<double>(10, 5, 3), y2, two), Error);  // 8 + 5 > 12
  CHECK_THROWS_AS(AxialPositions<float>({.d_model = 4, .dims = {1, 2}}), Error);
  CHECK(AxialPositions<float>({.d_model = 7}).config().dims == std::array<Index, 2>{3, 4});
}

// The aliasing rule's overlap test: exact for views of one matrix.
#include <catch2/catch.hpp>

#include "effattn/core/aliasing.hpp"
#include "effattn/core/types.hpp"

using namespace effattn;

TEST_CASE("detail::overlaps is exact for views of one matrix", "[core][aliasing]") {
  Matrix<float> m(6, 8);
  const ConstView<float> left = m.leftCols(4), right = m.rightCols(4);
  CHECK_FALSE(detail::overlaps(left, right));  // side by side: no shared element
  CHECK_FALSE(detail::overlaps(ConstView<float>(m.topRows(3)), ConstView<float>(m.bottomRows(3))));
  CHECK(detail::overlaps(left, ConstView<float>(m.block(2, 3, 2, 2))));  // shares (2..3, 3)
  CHECK_FALSE(detail::overlaps(left, ConstView<float>(m.block(2, 4, 4, 4))));
  CHECK(detail::overlaps(ConstView<float>(m.topRows(4)), ConstView<float>(m.middleRows(3, 3))));
  Matrix<float> other(6, 8);
  CHECK_FALSE(detail::overlaps(ConstView<float>(m), ConstView<float>(other)));
}

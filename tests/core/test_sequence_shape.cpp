// SequenceShape: validation, padding lengths and overflow.
#include <catch2/catch.hpp>

#include <limits>

#include "effattn/core/sequence_shape.hpp"

using namespace effattn;

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

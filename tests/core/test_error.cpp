// effattn::Error: the message names component, argument, given and expected.
#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>

#include "effattn/core/error.hpp"

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

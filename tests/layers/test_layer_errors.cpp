// Every layer rejects a bad configuration or call with an effattn::Error naming it.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

TEST_CASE("Layers reject bad configuration and bad calls with effattn::Error", "[layers][errors]") {
  using Catch::Contains;
  CHECK_THROWS_WITH(LayerNorm<float>({.d_model = 0}), Contains("LayerNorm") && Contains("d_model"));
  CHECK_THROWS_WITH(FeedForward<float>({.d_model = 0}),
                    Contains("FeedForward") && Contains("d_model"));
  CHECK_THROWS_WITH(Chunked<FeedForward<float>>({.layer = {.d_model = 4}, .chunk = 0}),
                    Contains("Chunked") && Contains("chunk"));
  CHECK_THROWS_WITH(Residual<Duplicate<float>>({.layer = {.d_model = 4}}),
                    Contains("Residual") && Contains("as wide as its input"));
  CHECK_THROWS_WITH((Reversible<FeedForward<float>, FeedForward<float>>(
                        {.f = {.d_model = 4}, .g = {.d_model = 6}})),
                    Contains("Reversible") && Contains("a layer from 4 to 4 columns"));
  CHECK_THROWS_WITH(Repeat<Duplicate<float>>({.block = {.d_model = 4}, .depth = 2}),
                    Contains("Repeat") && Contains("block 1") && Contains("8 columns"));
  CHECK_THROWS_WITH((Repeat<FeedForward<float>, 3>({.block = {.d_model = 4}, .depth = 2})),
                    Contains("depth") && Contains("the type's depth, 3"));
  CHECK_THROWS_WITH(Repeat<FeedForward<float>>({.block = {.d_model = 4}, .depth = 0}),
                    Contains("at least 1 block"));

  FeedForward<float> ff({.d_model = 4});
  const SequenceShape shape{1, 3, {}};
  Matrix<float> x(3, 5), y(3, 4), good(3, 4);
  good.setOnes();
  CHECK_THROWS_WITH(ff.forward(x, y, shape), Contains("FeedForward") && Contains("d_in = 4"));
  CHECK_THROWS_WITH(ff.backward(good, good, y, shape),
                    Contains("without a preceding training forward"));
  Matrix<float> wide(3, 8);
  CHECK_THROWS_WITH(ff.forward(good, wide, shape),
                    Contains("argument 'y'") && Contains("a 3×4 matrix"));

  Block<float> block(block_config<float>(4));
  Matrix<float> z(6, 8);
  z.setOnes();
  CHECK_THROWS_WITH(block.forward(z, z, SequenceShape{1, 6, {}}),
                    Contains("shares memory with 'x'"));

  // a rejected call leaves a training forward's state usable
  ff.set_training(true);
  ff.forward(good, y, shape);
  CHECK_THROWS(ff.forward(x, y, shape));
  Matrix<float> dx(3, 4);
  CHECK_NOTHROW(ff.backward(good, good, dx, shape));
}

// Dropout: its rate and scaling, gradients through the drawn mask, the mask's dependence on
// (seed, pass, row, column) only, and the same mask in a reversible block's recomputation.
#include <catch2/catch.hpp>

#include <cmath>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

TEST_CASE("Dropout is the identity while off and drops at its rate while on", "[layers]") {
  const Index rows = 300, d = 70;  // d not a multiple of 4: a partial 128-bit draw per row
  const double rate = 0.3;
  Dropout<double> drop({.d_model = d, .rate = rate, .seed = 4});
  const SequenceShape shape{3, 100, {}};
  const Matrix<double> x = random<double>(rows, d, 1);
  Matrix<double> y(rows, d);
  drop.forward(x, y, shape);
  CHECK(y == x);  // off by default

  set_dropout(drop, true);
  drop.forward(x, y, shape);
  Index zeros = 0;
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < d; ++c) {
      CHECK((y(r, c) == 0) == !drop.kept(r, c));
      if (y(r, c) == 0)
        ++zeros;
      else if (std::abs(y(r, c) - x(r, c) / (1 - rate)) > 1e-15 * std::abs(x(r, c)))
        FAIL("a kept element is not x / (1 − rate)");
    }
  // Binomial(21000, 0.3): sd ≈ 66, so 5 sd is ±330.
  CHECK(std::abs(double(zeros) - rate * rows * d) < 330);

  // Unbiased: the mean over many passes of y approaches x.
  Matrix<double> sum = Matrix<double>::Zero(rows, d);
  const int passes = 400;
  for (int p = 0; p < passes; ++p) {
    drop.forward(x, y, shape);
    sum += y;
    drop.advance();
  }
  // Per element, sd of the mean is |x|·sqrt(rate / (1 − rate) / passes) ≈ 0.033·|x|.
  CHECK(reference::relative_error(sum / passes, x) < 0.05);

  set_dropout(drop, false);
  drop.forward(x, y, shape);
  CHECK(y == x);
  Dropout<double> never({.d_model = d, .rate = 0, .seed = 4});
  set_dropout(never, true);
  never.forward(x, y, shape);
  CHECK(y == x);
}

TEST_CASE("Dropout's mask depends on seed, pass, row and column only", "[layers]") {
  const Index d = 16;
  Dropout<float> a({.d_model = d, .rate = 0.5, .seed = 7}),
      b({.d_model = d, .rate = 0.5, .seed = 7});
  Dropout<float> other({.d_model = d, .rate = 0.5, .seed = 8});
  for (auto* l : {&a, &b, &other})
    set_dropout(*l, true);
  const Matrix<float> x = random<float>(40, d, 2);
  Matrix<float> ya(40, d), yb(40, d), yc(40, d), again(40, d), dx(40, d);
  a.forward(x, ya, {2, 20, {}});
  b.forward(x, yb, {4, 10, {}});  // another shape, same rows: same mask
  other.forward(x, yc, {2, 20, {}});
  CHECK(ya == yb);
  CHECK(ya != yc);
  a.forward(x, again, {2, 20, {}});  // a repeated forward draws the same mask
  CHECK(again == ya);
  // Backward uses the forward's mask, then moves to the next pass.
  const Matrix<float> dy = random<float>(40, d, 3);
  a.backward(x, dy, dx, {2, 20, {}});
  for (Index r = 0; r < 40; ++r)
    for (Index c = 0; c < d; ++c)
      CHECK(dx(r, c) == (ya(r, c) == 0 ? 0.0f : dy(r, c) * 2.0f));
  CHECK(a.pass() == 1);
  a.forward(x, again, {2, 20, {}});
  CHECK(again != ya);
}

TEST_CASE("Dropout's gradients match finite differences with the mask fixed", "[layers]") {
  using Model = Sequential<FeedForward<double>, Dropout<double>>;
  Model model({.d_model = 6, .d_ff = 12, .seed = 1}, {.d_model = 6, .rate = 0.4, .seed = 2});
  randomise(model, 3);
  set_dropout(model, true);
  CHECK(model.get<1>().dropping());
  check_gradients(model, random<double>(10, 6, 4), {2, 5, {}});
}

TEST_CASE("A reversible block recomputes the same dropout mask in backward", "[layers]") {
  // F and G end in Dropout; the block's forward runs them untrained, its backward
  // recomputes them trained. Equal masks rebuild the input exactly and give the gradients of
  // the forward that ran.
  using Half = Sequential<PreNorm<FeedForward<double>>, Dropout<double>>;
  using Block = Reversible<Half, Half>;
  using Stack = Repeat<Block, 2>;
  const Index d = 6;
  const Half::Config half{
      {PreNorm<FeedForward<double>>::Config{.layer = {.d_model = d, .d_ff = 12}},
       Dropout<double>::Config{.d_model = d, .rate = 0.3}}};
  Stack stack({.block = {.f = half, .g = half}});
  randomise(stack, 5);
  set_dropout(stack, true);
  CHECK(stack[1].g().get<1>().dropping());
  const SequenceShape shape{2, 7, {}};
  const Matrix<double> x = random<double>(14, 2 * d, 6);
  Matrix<double> y(14, 2 * d), x_back(14, 2 * d), dx(14, 2 * d), y_off(14, 2 * d);
  stack.forward(x, y, shape);
  set_dropout(stack, false);
  stack.forward(x, y_off, shape);
  CHECK(reference::relative_error(y, y_off) > 0.01);  // dropout changed the output
  set_dropout(stack, true);

  const Matrix<double> dy = random<double>(14, 2 * d, 7);
  stack.zero_grad();
  stack.backward_from_output(y, dy, x_back, dx, shape);
  CHECK(reference::relative_error(x_back, x) < 1e-13);
  CHECK(stack[0].f().get<1>().pass() == 1);  // the backward moved to the next mask

  // Gradients equal finite differences of the forward that ran: check_gradients' backward
  // on a reversible stack rebuilds inputs and recomputes F and G (the same masks), while
  // its finite differences repeat the plain forward (still pass 0).
  Stack fresh({.block = {.f = half, .g = half}});
  randomise(fresh, 5);
  set_dropout(fresh, true);
  STATIC_REQUIRE(Stack::reversible);
  check_gradients(fresh, x, shape, 1e-6);
}

TEST_CASE("Dropout rejects a bad rate and bad calls", "[layers]") {
  CHECK_THROWS_AS(Dropout<float>({.d_model = 4, .rate = 1.0}), Error);
  CHECK_THROWS_AS(Dropout<float>({.d_model = 4, .rate = -0.1}), Error);
  CHECK_THROWS_AS(Dropout<float>({.d_model = 0}), Error);
  Dropout<float> drop({.d_model = 4, .rate = 0.5});
  set_dropout(drop, true);
  Matrix<float> x(6, 4), y(6, 5);
  x.setOnes();
  CHECK_THROWS_AS(drop.forward(x, y, {1, 6, {}}), Error);
  Matrix<float> dx(6, 4), dy(6, 4);
  dy.setOnes();
  CHECK_THROWS_AS(drop.backward(x, dy, dx, {1, 5, {}}), Error);
  CHECK(drop.pass() == 0);  // a rejected backward does not move to the next mask
}

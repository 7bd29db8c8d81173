// Reversible and stacks of it: inverse, backward from the output, memory independent of depth, a
// whole encoder with every policy.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

namespace {
template <class A>
void check_encoder(typename A::Config attn, const SequenceShape& shape) {
  using B = Reversible<PreNorm<A>, PreNorm<Chunked<FeedForward<double>>>>;
  using Encoder = Sequential<Duplicate<double>, Repeat<B, 2>, MergeHalves<double>>;
  const Index d = attn.d_model;
  Encoder encoder({.d_model = d},
                  {.block = {.f = {.layer = attn},
                             .g = {.layer = {.layer = {.d_model = d, .d_ff = 2 * d}, .chunk = 4}}}},
                  {.d_model = d, .merge = Merge::mean});
  STATIC_REQUIRE(!Encoder::reversible);
  STATIC_REQUIRE(Repeat<B, 2>::reversible);
  randomise(encoder, 60);
  check_gradients(encoder, random<double>(shape.tokens(), d, 18), shape, 1e-6);
}
}  // namespace

TEST_CASE("Reversible stacks invert their forward to rounding", "[layers][reversible]") {
  const SequenceShape shape{2, 11, {}};
  auto round_trip = [&]<class S>(S, Index depth) {
    Repeat<Block<S>> stack({.block = block_config<S>(), .depth = depth});
    const Matrix<S> x = random<S>(22, 16, 12);
    Matrix<S> y(22, 16), back(22, 16);
    stack.forward(x, y, shape);
    stack.inverse(y, back, shape);
    CHECK(reference::relative_error(y, x) > 0.1);  // the stack did something
    return reference::relative_error(back, x);
  };
  for (Index depth : {1, 6, 24}) {
    CAPTURE(depth);
    CHECK(round_trip(double{}, depth) < 1e-12);
    CHECK(round_trip(float{}, depth) < 1e-4);
  }
  // a single block: inverse of forward, and forward of inverse
  Block<double> block(block_config<double>());
  const Matrix<double> x = random<double>(22, 16, 13);
  Matrix<double> y(22, 16), back(22, 16);
  block.inverse(x, y, shape);
  block.forward(y, back, shape);
  CHECK(reference::relative_error(back, x) < 1e-13);
}

TEST_CASE("Reversible backward equals backpropagation with stored activations",
          "[layers][reversible]") {
  const SequenceShape shape{2, 9, {9, 5}};
  const Index depth = 3, d = 8, rows = 18;
  Repeat<Block<double>> stack({.block = block_config<double>(d), .depth = depth});
  randomise(stack, 50);
  const Matrix<double> x = random<double>(rows, 2 * d, 14), dy = random<double>(rows, 2 * d, 15);

  // Reference: the same F and G, trained, every intermediate kept, chain rule by hand.
  std::vector<Matrix<double>> x2(depth), y1(depth);
  Matrix<double> a1 = x.leftCols(d), a2 = x.rightCols(d), t(rows, d);
  for (Index i = 0; i < depth; ++i) {
    auto& f = stack[i].f();
    auto& g = stack[i].g();
    f.set_training(true);
    g.set_training(true);
    x2[i] = a2;
    f.forward(a2, t, shape);
    y1[i] = a1 + t;
    g.forward(y1[i], t, shape);
    a2 = a2 + t;
    a1 = y1[i];
  }
  Matrix<double> y_ref(rows, 2 * d);
  y_ref << a1, a2;
  Matrix<double> d1 = dy.leftCols(d), d2 = dy.rightCols(d);
  for (Index i = depth - 1; i >= 0; --i) {
    stack[i].g().backward(y1[i], d2, t, shape);
    d1 += t;
    stack[i].f().backward(x2[i], d1, t, shape);
    d2 += t;
    stack[i].f().set_training(false);
    stack[i].g().set_training(false);
  }
  Matrix<double> dx_ref(rows, 2 * d);
  dx_ref << d1, d2;
  const auto grads_ref = gradients(stack);

  stack.zero_grad();
  stack.set_training(true);
  Matrix<double> y(rows, 2 * d), dx(rows, 2 * d);
  stack.forward(x, y, shape);
  CHECK(reference::relative_error(y, y_ref) < 1e-14);
  stack.backward(x, dy, dx, shape);
  CHECK(reference::relative_error(dx, dx_ref) < 1e-12);
  const auto grads = gradients(stack);
  REQUIRE(grads.size() == grads_ref.size());
  std::vector<std::string> names;
  stack.visit_parameters([&](std::string_view name, auto&, auto&) { names.emplace_back(name); });
  for (std::size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(names[i]);  // absolute below norm 1: b_k's gradient is 0 up to rounding
    CHECK(reference::gradient_error(grads[i], grads_ref[i]) < 1e-12);
  }
}

TEST_CASE("A reversible stack's activation memory does not grow with depth",
          "[layers][reversible]") {
  const SequenceShape shape{1, 40, {}};
  const Matrix<float> x = random<float>(40, 16, 16), dy = random<float>(40, 16, 17);
  auto peak = [&](auto& stack) {
    const Matrix<float> xin = x.leftCols(stack.d_in());
    Matrix<float> y(40, stack.d_out()), dx(40, stack.d_in());
    Matrix<float> g = dy.leftCols(stack.d_out());
    stack.set_training(true);
    activation_meter().reset_peak();
    const std::size_t before = activation_meter().in_use();
    stack.forward(xin, y, shape);
    stack.backward(xin, g, dx, shape);
    const std::size_t p = activation_meter().peak() - before;
    CHECK(activation_meter().in_use() == before + stack.activation_bytes());
    stack.set_training(false);
    CHECK(activation_meter().in_use() == before);
    return p;
  };
  using Plain = Residual<PreNorm<Attn<float>>>;
  std::vector<std::size_t> rev, plain;
  for (Index depth : {1, 4, 12}) {
    Repeat<Block<float>> r({.block = block_config<float>(), .depth = depth});
    Repeat<Plain> p({.block = {.layer = {.layer = {.d_model = 16, .heads = 2}}}, .depth = depth});
    rev.push_back(peak(r));
    plain.push_back(peak(p));
  }
  CHECK(rev[0] > 0);
  CHECK(rev[0] == rev[1]);
  CHECK(rev[1] == rev[2]);
  // the ordinary stack keeps every block's activations: exactly linear in depth
  CHECK(plain[1] > plain[0]);
  CHECK(3 * (plain[2] - plain[1]) == 8 * (plain[1] - plain[0]));
}

TEST_CASE("A 2-block reversible encoder trains with every attention policy",
          "[layers][reversible]") {
  const SequenceShape shape{2, 10, {10, 7}};
  const SequenceShape full{2, 10, {}};
  SECTION("full") {
    check_encoder<MultiHeadAttention<FullAttention<double>, Causal>>({.d_model = 8, .heads = 2},
                                                                     shape);
  }
  SECTION("favor") {
    check_encoder<MultiHeadAttention<Favor<double>, Causal>>(
        {.d_model = 8, .heads = 2, .policy = {.features = 16, .chunk = 4, .epsilon = 0.0}},
        shape);  // ε ≠ 0 ties the output to the stabiliser's max, which backward holds fixed
  }
  SECTION("lowrank") {
    check_encoder<MultiHeadAttention<LowRank<double>>>(
        {.d_model = 8, .heads = 2, .policy = {.projection = {.k = 4, .n_max = 16}}}, full);
  }
  SECTION("lsh") {
    check_encoder<MultiHeadAttention<LSHAttention<double>, Causal>>(
        {.d_model = 8, .heads = 2, .policy = {.chunk = 4, .rounds = 2}}, shape);
  }
}

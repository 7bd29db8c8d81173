// Layers: LayerNorm, FeedForward, Chunked, Residual, PreNorm, Reversible, Repeat,
// Sequential, Duplicate and MergeHalves, against naive double references and finite
// differences; activation and scratch memory read from the library's own counters.

#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "effattn/effattn.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

template <class S>
Matrix<S> random(Index rows, Index cols, std::uint64_t seed, double sd = 1.0) {
  Matrix<S> m(rows, cols);
  CounterRng(seed).fill_normal(m, sd);
  return m;
}

// Gives every parameter (biases, gamma, beta included) random values, so no gradient
// check passes because a bias is 0 or gamma is 1.
template <class L>
void randomise(L& layer, std::uint64_t seed) {
  layer.visit_parameters(
      [&](std::string_view, auto& w, auto&) { CounterRng(seed++).fill_normal(w, 0.5); });
}

// Finite differences of loss = Σ y ⊙ g against backward, for x and every parameter.
template <class L>
void check_gradients(L& layer, Matrix<double> x, const SequenceShape& shape, double tol = 1e-7) {
  Matrix<double> y(x.rows(), layer.d_out()), dx(x.rows(), layer.d_in());
  const Matrix<double> g = random<double>(x.rows(), layer.d_out(), 99);
  layer.set_training(false);
  auto loss = [&] {
    layer.forward(x, y, shape);
    return y.cwiseProduct(g).sum();
  };
  std::vector<MatD> numeric;
  layer.visit_parameters([&](std::string_view, Matrix<double>& w, auto&) {
    numeric.push_back(reference::numeric_gradient(loss, w));
  });
  const MatD num_x = reference::numeric_gradient(loss, x);
  layer.set_training(true);
  layer.zero_grad();
  layer.forward(x, y, shape);
  layer.backward(x, g, dx, shape);
  CHECK(reference::gradient_error(dx, num_x) < tol);
  std::size_t i = 0;
  layer.visit_parameters([&](std::string_view name, auto&, Matrix<double>& grad) {
    CAPTURE(name);
    CHECK(reference::gradient_error(grad, numeric[i++]) < tol);
  });
  layer.set_training(false);
}

template <class L>
std::vector<Matrix<double>> gradients(L& layer) {
  std::vector<Matrix<double>> out;
  layer.visit_parameters(
      [&](std::string_view, auto&, auto& g) { out.push_back(g.template cast<double>()); });
  return out;
}

MatD naive_layer_norm(const MatD& x, const MatD& gamma, const MatD& beta, double eps) {
  MatD y(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    double mean = 0, var = 0;
    for (Index c = 0; c < x.cols(); ++c)
      mean += x(t, c) / double(x.cols());
    for (Index c = 0; c < x.cols(); ++c)
      var += (x(t, c) - mean) * (x(t, c) - mean) / double(x.cols());
    for (Index c = 0; c < x.cols(); ++c)
      y(t, c) = (x(t, c) - mean) / std::sqrt(var + eps) * gamma(0, c) + beta(0, c);
  }
  return y;
}

double naive_activation(double x, Activation a) {
  if (a == Activation::relu) return x > 0 ? x : 0;
  const double pi = 3.14159265358979323846;
  return 0.5 * x * (1 + std::tanh(std::sqrt(2 / pi) * (x + 0.044715 * x * x * x)));
}

// Parameters of a layer by name, as doubles.
template <class L>
std::map<std::string, MatD> parameters(L& layer) {
  std::map<std::string, MatD> out;
  layer.visit_parameters([&](std::string_view name, auto& w, auto&) {
    out[std::string(name)] = w.template cast<double>();
  });
  return out;
}

template <class S>
using Attn = MultiHeadAttention<FullAttention<S>, Causal>;
template <class S>
using Block = Reversible<PreNorm<Attn<S>>, PreNorm<Chunked<FeedForward<S>>>>;

template <class S>
typename Block<S>::Config block_config(Index d = 8) {
  return {.f = {.fn = {.d_model = d, .heads = 2, .seed = 1}},
          .g = {.fn = {.layer = {.d_model = d, .d_ff = 2 * d, .seed = 2}, .chunk = 5}}};
}

}  // namespace

TEST_CASE("LayerNorm matches a naive double reference, forward and backward", "[layers]") {
  const SequenceShape shape{2, 7, {}};
  LayerNorm<double> norm({.width = 6, .eps = 1e-5});
  randomise(norm, 3);
  const Matrix<double> x = random<double>(14, 6, 1, 2.0);
  Matrix<double> y(14, 6);
  norm.forward(x, y, shape);
  const auto p = parameters(norm);
  CHECK(reference::relative_error(y, naive_layer_norm(x, p.at("gamma"), p.at("beta"), 1e-5)) <
        1e-13);

  LayerNorm<float> norm_f({.width = 6, .eps = 1e-5});
  randomise(norm_f, 3);
  Matrix<float> y_f(14, 6);
  norm_f.forward(x.cast<float>(), y_f, shape);
  CHECK(reference::relative_error(y_f, y) < 1e-5);

  check_gradients(norm, x, shape);
}

TEST_CASE("FeedForward matches a naive double reference (ReLU and GELU)", "[layers]") {
  const SequenceShape shape{1, 9, {}};
  for (Activation act : {Activation::relu, Activation::gelu}) {
    CAPTURE(int(act));
    FeedForward<double> ff({.d_model = 5, .d_ff = 11, .activation = act, .seed = 4});
    randomise(ff, 10);
    const Matrix<double> x = random<double>(9, 5, 2);
    Matrix<double> y(9, 5);
    ff.forward(x, y, shape);
    const auto p = parameters(ff);
    MatD h = x * p.at("w_1");
    for (Index t = 0; t < h.rows(); ++t)
      for (Index c = 0; c < h.cols(); ++c)
        h(t, c) = naive_activation(h(t, c) + p.at("b_1")(0, c), act);
    MatD expected = h * p.at("w_2");
    expected.rowwise() += p.at("b_2").row(0);
    CHECK(reference::relative_error(y, expected) < 1e-13);

    FeedForward<float> ff_f({.d_model = 5, .d_ff = 11, .activation = act, .seed = 4});
    randomise(ff_f, 10);
    Matrix<float> y_f(9, 5);
    ff_f.forward(x.cast<float>(), y_f, shape);
    CHECK(reference::relative_error(y_f, expected) < 1e-5);

    check_gradients(ff, x, shape);
  }
  // defaults: d_ff = 4·d_model, weights seeded
  FeedForward<float> a({.d_model = 4}), b({.d_model = 4}), c({.d_model = 4, .seed = 1});
  CHECK(a.d_ff() == 16);
  CHECK(parameters(a) == parameters(b));
  CHECK(parameters(a).at("w_1") != parameters(c).at("w_1"));
}

TEST_CASE("Chunked<FeedForward> equals FeedForward, with O(c·d_ff) scratch", "[layers]") {
  const Index n = 24, d = 6, d_ff = 40;
  const SequenceShape shape{2, 12, {}};
  const Matrix<double> x = random<double>(n, d, 5), dy = random<double>(n, d, 6);
  FeedForward<double> plain({.d_model = d, .d_ff = d_ff, .seed = 7});
  randomise(plain, 20);
  Matrix<double> y(n, d), dx(n, d);
  plain.set_training(true);
  plain.forward(x, y, shape);
  plain.backward(x, dy, dx, shape);
  const auto grads = gradients(plain);

  for (Index c : {1, 4, 7, 12, 100}) {  // dividing n and not, and longer than n
    CAPTURE(c);
    Chunked<FeedForward<double>> chunked(
        {.layer = {.d_model = d, .d_ff = d_ff, .seed = 7}, .chunk = c});
    randomise(chunked, 20);
    Matrix<double> y_c(n, d), dx_c(n, d);
    chunked.set_training(true);
    chunked.forward(x, y_c, shape);
    CHECK(chunked.activation_bytes() == 0);
    chunked.backward(x, dy, dx_c, shape);
    CHECK(reference::relative_error(y_c, y) < 1e-14);
    CHECK(reference::relative_error(dx_c, dx) < 1e-14);
    const auto grads_c = gradients(chunked);
    for (std::size_t i = 0; i < grads.size(); ++i)
      CHECK(reference::relative_error(grads_c[i], grads[i]) < 1e-13);
  }

  // Scratch, from the layer workspace's peak counter: c rows of hidden units at a time.
  const Index big = 512, c = 16;
  const Matrix<float> xf = random<float>(big, d, 8), dyf = random<float>(big, d, 9);
  Matrix<float> yf(big, d), dxf(big, d);
  const SequenceShape big_shape{1, big, {}};
  auto peaks = [&](auto& layer) {
    layer.set_training(true);
    layer_workspace().reset_peak();
    activation_meter().reset_peak();
    const std::size_t held = activation_meter().in_use();
    layer.forward(xf, yf, big_shape);
    layer.backward(xf, dyf, dxf, big_shape);
    layer.set_training(false);
    return std::pair{layer_workspace().peak_bytes(), activation_meter().peak() - held};
  };
  FeedForward<float> whole({.d_model = d, .d_ff = d_ff});
  Chunked<FeedForward<float>> chunked({.layer = {.d_model = d, .d_ff = d_ff}, .chunk = c});
  const auto [whole_scratch, whole_held] = peaks(whole);
  const auto [chunk_scratch, chunk_held] = peaks(chunked);
  using W = Workspace;
  // a chunk's output (c × d), its hidden activation (c × d_ff) and one gelu row (d_ff)
  CHECK(chunk_scratch <=
        W::bytes_for<float>(c * d) + W::bytes_for<float>(c * d_ff) + W::bytes_for<float>(d_ff));
  CHECK(whole_scratch >= W::bytes_for<float>(big * d_ff));
  CHECK(chunk_held == W::bytes_for<float>(c * d_ff));  // one chunk's pre-activation
  CHECK(whole_held == W::bytes_for<float>(big * d_ff));
}

TEST_CASE("Residual and PreNorm compute x + F(x) and F(LayerNorm(x)), and train", "[layers]") {
  const SequenceShape shape{2, 6, {3, 6}};
  const Matrix<double> x = random<double>(12, 8, 11);
  Residual<FeedForward<double>> res({.fn = {.d_model = 8, .d_ff = 12, .seed = 3}});
  FeedForward<double> ff({.d_model = 8, .d_ff = 12, .seed = 3});
  Matrix<double> y(12, 8), f(12, 8);
  res.forward(x, y, shape);
  ff.forward(x, f, shape);
  CHECK(reference::relative_error(y, x + f) < 1e-15);

  PreNorm<Attn<double>> pre({.fn = {.d_model = 8, .heads = 2, .seed = 5}});
  randomise(pre, 30);
  LayerNorm<double> norm({.width = 8});
  Attn<double> attn({.d_model = 8, .heads = 2, .seed = 5});
  const auto p = parameters(pre);
  norm.visit_parameters(
      [&](std::string_view name, auto& w, auto&) { w = p.at("norm." + std::string(name)); });
  attn.visit_parameters(
      [&](std::string_view name, auto& w, auto&) { w = p.at("fn." + std::string(name)); });
  Matrix<double> z(12, 8), expected(12, 8);
  norm.forward(x, z, shape);
  attn.forward(z, expected, shape);
  pre.forward(x, y, shape);
  CHECK(reference::relative_error(y, expected) < 1e-15);

  check_gradients(pre, x, shape);
  Residual<PreNorm<FeedForward<double>>> res_pre(
      {.fn = {.fn = {.d_model = 8, .d_ff = 16, .seed = 2}}});
  randomise(res_pre, 40);
  check_gradients(res_pre, x, shape);
}

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
    Repeat<Plain> p({.block = {.fn = {.fn = {.d_model = 16, .heads = 2}}}, .depth = depth});
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

namespace {
template <class A>
void check_encoder(typename A::Config attn, const SequenceShape& shape) {
  using B = Reversible<PreNorm<A>, PreNorm<Chunked<FeedForward<double>>>>;
  using Encoder = Sequential<Duplicate<double>, Repeat<B, 2>, MergeHalves<double>>;
  const Index d = attn.d_model;
  Encoder encoder({.width = d},
                  {.block = {.f = {.fn = attn},
                             .g = {.fn = {.layer = {.d_model = d, .d_ff = 2 * d}, .chunk = 4}}}},
                  {.width = d, .merge = Merge::mean});
  STATIC_REQUIRE(!Encoder::reversible);
  STATIC_REQUIRE(Repeat<B, 2>::reversible);
  randomise(encoder, 60);
  check_gradients(encoder, random<double>(shape.tokens(), d, 18), shape, 1e-6);
}
}  // namespace

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

TEST_CASE("Duplicate and MergeHalves enter and leave the two-half layout", "[layers]") {
  const SequenceShape shape{1, 5, {}};
  const Matrix<double> x = random<double>(5, 3, 19);
  Sequential<Duplicate<double>, MergeHalves<double>> mean({.width = 3},
                                                          {.width = 3, .merge = Merge::mean});
  Sequential<Duplicate<double>, MergeHalves<double>> concat({.width = 3}, {.width = 3});
  Matrix<double> y(5, 3), y2(5, 6);
  mean.forward(x, y, shape);
  CHECK(y == x);
  concat.forward(x, y2, shape);
  CHECK(y2.leftCols(3) == x);
  CHECK(y2.rightCols(3) == x);
  check_gradients(mean, x, shape);
  check_gradients(concat, x, shape);
}

TEST_CASE("Layers reject bad configuration and bad calls with effattn::Error", "[layers][errors]") {
  using Catch::Contains;
  CHECK_THROWS_WITH(LayerNorm<float>({.width = 0}), Contains("LayerNorm") && Contains("width"));
  CHECK_THROWS_WITH(FeedForward<float>({.d_model = 0}),
                    Contains("FeedForward") && Contains("d_model"));
  CHECK_THROWS_WITH(Chunked<FeedForward<float>>({.layer = {.d_model = 4}, .chunk = 0}),
                    Contains("Chunked") && Contains("chunk"));
  CHECK_THROWS_WITH(Residual<Duplicate<float>>({.fn = {.width = 4}}),
                    Contains("Residual") && Contains("as wide as its input"));
  CHECK_THROWS_WITH((Reversible<FeedForward<float>, FeedForward<float>>(
                        {.f = {.d_model = 4}, .g = {.d_model = 6}})),
                    Contains("Reversible") && Contains("a layer from 4 to 4 columns"));
  CHECK_THROWS_WITH(Repeat<Duplicate<float>>({.block = {.width = 4}, .depth = 2}),
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

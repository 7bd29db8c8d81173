// MultiHeadAttention<FullAttention> against the naive reference: forward, gradients, errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "effattn/attention/full_attention.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/layers/multi_head_attention.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

template <class Block>
reference::MhaWeights weights_of(Block& block) {
  reference::MhaWeights w;
  block.visit_parameters([&](std::string_view name, auto& value, auto&) {
    const MatD m = value.template cast<double>();
    if (name == "w_q") w.w_q = m;
    if (name == "w_k") w.w_k = m;
    if (name == "w_v") w.w_v = m;
    if (name == "w_o") w.w_o = m;
    if (name == "b_q") w.b_q = m.row(0).transpose();
    if (name == "b_k") w.b_k = m.row(0).transpose();
    if (name == "b_v") w.b_v = m.row(0).transpose();
    if (name == "b_o") w.b_o = m.row(0).transpose();
  });
  return w;
}

// Gives the biases non-zero values, so the tests see them.
template <class Block>
void randomise_biases(Block& block, std::uint64_t seed) {
  std::uint64_t stream = 100;
  block.visit_parameters([&](std::string_view name, auto& value, auto&) {
    if (name[0] == 'b') CounterRng(seed, stream++).fill_normal(value, 0.5);
  });
}

template <class S>
double tolerance() {
  return std::is_same_v<S, float> ? 5e-5 : 1e-12;
}

struct SelfCase {
  Index batch, seq, d_model, heads;
  std::vector<Index> lengths;
  bool bias;
};

}  // namespace

TEMPLATE_TEST_CASE("MultiHeadAttention self-attention equals the naive reference", "[mha]", float,
                   double) {
  using S = TestType;
  const std::vector<SelfCase> cases = {
      {1, 1, 4, 1, {}, true},        {3, 37, 32, 4, {}, true},  {2, 29, 24, 3, {29, 11}, false},
      {2, 70, 16, 2, {0, 70}, true}, {1, 130, 64, 8, {}, true},
  };
  for (const auto& c : cases) {
    for (const bool causal : {false, true}) {
      CAPTURE(c.batch, c.seq, c.d_model, c.heads, c.lengths.size(), causal);
      const SequenceShape shape{c.batch, c.seq, c.lengths};
      Matrix<S> x(shape.tokens(), c.d_model), y(shape.tokens(), c.d_model);
      CounterRng(21).fill_normal(x);
      MatD expected;
      auto check = [&](auto& block) {
        randomise_biases(block, 3);
        block.forward(x, y, shape);
        const Index dh = c.d_model / c.heads;
        expected = reference::multi_head_attention(
            x.template cast<double>(), x.template cast<double>(), weights_of(block), c.heads, dh,
            dh, shape, shape, causal, 1.0 / std::sqrt(double(dh)));
        CHECK(reference::relative_error(y, expected) < tolerance<S>());
        CHECK(block.scratch_growths() == 0);
      };
      // Small tiles, so several tiles, splits and the diagonal are all exercised.
      typename FullAttention<S>::Config tiles{8, 16, {}};
      if (causal) {
        MultiHeadAttention<FullAttention<S>, Causal> block(
            {c.d_model, c.heads, 0, 0, 0, c.bias, 5, tiles});
        check(block);
      } else {
        MultiHeadAttention<FullAttention<S>> block({c.d_model, c.heads, 0, 0, 0, c.bias, 5, tiles});
        check(block);
      }
    }
  }
}

TEMPLATE_TEST_CASE("MultiHeadAttention cross-attention equals the naive reference", "[mha]", float,
                   double) {
  using S = TestType;
  // n_q != n_k, d_context != d_model, d_value != d_head, padded context.
  const SequenceShape q_shape{2, 13}, kv_shape{2, 31, {31, 17}};
  MultiHeadAttention<FullAttention<S>> block(
      {.d_model = 12, .heads = 3, .d_head = 5, .d_value = 7, .d_context = 9, .seed = 8});
  randomise_biases(block, 4);
  Matrix<S> x(q_shape.tokens(), 12), ctx(kv_shape.tokens(), 9), y(q_shape.tokens(), 12);
  CounterRng(22).fill_normal(x);
  CounterRng(23).fill_normal(ctx);
  block.forward(x, ctx, y, q_shape, kv_shape);
  const MatD expected = reference::multi_head_attention(
      x.template cast<double>(), ctx.template cast<double>(), weights_of(block), 3, 5, 7, q_shape,
      kv_shape, false, 1.0 / std::sqrt(5.0));
  CHECK(reference::relative_error(y, expected) < tolerance<S>());
}

namespace {

// Checks every parameter gradient and the input gradient(s) against finite differences.
template <class Block, class Forward, class Backward>
void check_gradients(Block& block, Matrix<double>& y_weights, Forward forward, Backward backward,
                     std::vector<Matrix<double>*> inputs, bool rotary = false) {
  auto loss = [&] { return forward().cwiseProduct(y_weights).sum(); };
  block.set_training(true);
  block.zero_grad();
  forward();
  const std::vector<Matrix<double>> input_grads = backward();
  std::vector<std::string> names;
  block.visit_parameters([&](std::string_view name, Matrix<double>& value, Matrix<double>& grad) {
    names.emplace_back(name);
    CAPTURE(std::string(name));
    CHECK(reference::gradient_error(grad, reference::numeric_gradient(loss, value)) < 1e-7);
    // Adding b_k shifts every logit of a row by the same amount: softmax ignores it (unless
    // rotary positions turn it differently at each key).
    if (name == "b_k" && !rotary)
      CHECK(grad.norm() < 1e-12);
    else
      CHECK(grad.norm() > 1e-3);
  });
  CHECK(names.size() == 8);
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    CAPTURE(i);
    CHECK(reference::gradient_error(input_grads[i], reference::numeric_gradient(loss, *inputs[i])) <
          1e-7);
  }
}

}  // namespace

TEST_CASE("MultiHeadAttention gradients match finite differences (double)", "[mha][backward]") {
  SECTION("causal self-attention with padding") {
    const SequenceShape shape{2, 9, {9, 6}};
    MultiHeadAttention<FullAttention<double>, Causal> block(
        {.d_model = 6, .heads = 2, .seed = 1, .policy = {4, 4, {}}});
    randomise_biases(block, 2);
    Matrix<double> x(shape.tokens(), 6), w(shape.tokens(), 6);
    CounterRng(30).fill_normal(x);
    CounterRng(31).fill_normal(w);
    shape.zero_padding(w);  // padded rows are not part of the loss: their dy is ignored
    check_gradients(
        block, w,
        [&] {
          Matrix<double> y(shape.tokens(), 6);
          block.forward(x, y, shape);
          return y;
        },
        [&] {
          Matrix<double> dx(shape.tokens(), 6);
          block.backward(x, w, dx, shape);
          return std::vector<Matrix<double>>{dx};
        },
        {&x});
  }
  SECTION("rotary positions (half the columns) over one key/value head (MQA)") {
    const SequenceShape shape{2, 9, {9, 6}};
    MultiHeadAttention<FullAttention<double>, Causal> block({.d_model = 8,
                                                             .heads = 2,
                                                             .seed = 1,
                                                             .policy = {4, 4, {}},
                                                             .kv_heads = 1,
                                                             .rotary = {true, 100.0, 2}});
    randomise_biases(block, 2);
    Matrix<double> x(shape.tokens(), 8), w(shape.tokens(), 8);
    CounterRng(35).fill_normal(x);
    CounterRng(36).fill_normal(w);
    shape.zero_padding(w);
    check_gradients(
        block, w,
        [&] {
          Matrix<double> y(shape.tokens(), 8);
          block.forward(x, y, shape);
          return y;
        },
        [&] {
          Matrix<double> dx(shape.tokens(), 8);
          block.backward(x, w, dx, shape);
          return std::vector<Matrix<double>>{dx};
        },
        {&x}, true);
  }
  SECTION("cross-attention") {
    const SequenceShape q_shape{2, 5}, kv_shape{2, 8, {3, 8}};
    MultiHeadAttention<FullAttention<double>> block(
        {.d_model = 4, .heads = 2, .d_head = 3, .d_value = 2, .d_context = 5, .seed = 2});
    randomise_biases(block, 3);
    Matrix<double> x(q_shape.tokens(), 4), ctx(kv_shape.tokens(), 5), w(q_shape.tokens(), 4);
    CounterRng(32).fill_normal(x);
    CounterRng(33).fill_normal(ctx);
    CounterRng(34).fill_normal(w);
    check_gradients(
        block, w,
        [&] {
          Matrix<double> y(q_shape.tokens(), 4);
          block.forward(x, ctx, y, q_shape, kv_shape);
          return y;
        },
        [&] {
          Matrix<double> dx(q_shape.tokens(), 4), dctx(kv_shape.tokens(), 5);
          block.backward(x, ctx, w, dx, dctx, q_shape, kv_shape);
          return std::vector<Matrix<double>>{dx, dctx};
        },
        {&x, &ctx});
  }
}

TEST_CASE("MultiHeadAttention initialisation is seeded and gradients accumulate", "[mha]") {
  using Block = MultiHeadAttention<FullAttention<float>>;
  Block a({.d_model = 8, .heads = 2, .seed = 3}), b({.d_model = 8, .heads = 2, .seed = 3}),
      c({.d_model = 8, .heads = 2, .seed = 4});
  CHECK(weights_of(a).w_q == weights_of(b).w_q);
  CHECK(weights_of(a).w_o == weights_of(b).w_o);
  CHECK(weights_of(a).w_q != weights_of(c).w_q);
  CHECK(weights_of(a).w_q != weights_of(a).w_k);  // each weight has its own stream

  const SequenceShape shape{1, 6};
  Matrix<float> x(6, 8), y(6, 8), dy(6, 8), dx(6, 8);
  CounterRng(1).fill_normal(x);
  CounterRng(2).fill_normal(dy);
  a.set_training(true);
  a.forward(x, y, shape);
  a.backward(x, dy, dx, shape);
  Matrix<float> once;
  a.visit_parameters([&](std::string_view n, auto&, auto& g) {
    if (n == "w_q") once = g;
  });
  a.forward(x, y, shape);
  a.backward(x, dy, dx, shape);
  a.visit_parameters([&](std::string_view n, auto&, auto& g) {
    if (n == "w_q") CHECK(reference::relative_error(g, (2 * once).eval()) < 1e-6);
  });
  a.zero_grad();
  a.visit_parameters([&](std::string_view, auto&, auto& g) { CHECK(g.isZero(0)); });
  CHECK(a.activation_bytes() > 0);
  a.set_training(false);
  a.forward(x, y, shape);
  CHECK_THROWS_WITH(a.backward(x, dy, dx, shape), Catch::Contains("set_training(true)"));
}

TEST_CASE("Grouped key/value heads equal their weights repeated for every query head",
          "[mha][gqa]") {
  // heads 4 of width 4 over 2 key/value heads: w_k, w_v are 16 × 8; a block without groups
  // given those weights repeated per query head computes the same, and the grouped gradients
  // of w_k, b_k, w_v, b_v are the sums of the repeated ones over each group.
  using Block = MultiHeadAttention<FullAttention<double>, Causal>;
  Block grouped({.d_model = 16, .heads = 4, .seed = 3, .kv_heads = 2});
  Block repeated({.d_model = 16, .heads = 4, .seed = 4});
  CHECK(grouped.kv_heads() == 2);
  randomise_biases(grouped, 5);
  std::map<std::string, Matrix<double>> weights;
  grouped.visit_parameters(
      [&](std::string_view name, auto& value, auto&) { weights[std::string(name)] = value; });
  CHECK(weights["w_k"].cols() == 8);
  CHECK(weights["b_v"].cols() == 8);
  const auto repeat = [](const Matrix<double>& m) {
    Matrix<double> r(m.rows(), 16);
    for (Index h = 0; h < 4; ++h)
      r.middleCols(h * 4, 4) = m.middleCols(h / 2 * 4, 4);
    return r;
  };
  repeated.visit_parameters([&](std::string_view name, auto& value, auto&) {
    const Matrix<double>& w = weights[std::string(name)];
    value = name.substr(1) == "_k" || name.substr(1) == "_v" ? repeat(w) : w;
  });
  const SequenceShape shape{2, 37, {37, 20}};
  Matrix<double> x(shape.tokens(), 16), dy(shape.tokens(), 16);
  CounterRng(6).fill_normal(x);
  CounterRng(7).fill_normal(dy);
  std::map<std::string, Matrix<double>> grads[2];
  Matrix<double> y[2], dx[2];
  int i = 0;
  for (Block* block : {&grouped, &repeated}) {
    y[i].resize(x.rows(), 16);
    dx[i].resize(x.rows(), 16);
    block->set_training(true);
    block->forward(x, y[i], shape);
    block->backward(x, dy, dx[i], shape);
    block->visit_parameters(
        [&](std::string_view name, auto&, auto& grad) { grads[i][std::string(name)] = grad; });
    ++i;
  }
  CHECK(reference::relative_error(y[0], y[1]) < 1e-13);
  CHECK(reference::relative_error(dx[0], dx[1]) < 1e-13);
  for (const auto& [name, grad] : grads[0]) {
    CAPTURE(name);
    Matrix<double> expected = grads[1][name];
    if (name.substr(1) == "_k" || name.substr(1) == "_v") {
      expected.resize(grad.rows(), 8);
      for (Index g = 0; g < 2; ++g)
        expected.middleCols(g * 4, 4) =
            grads[1][name].middleCols(g * 8, 4) + grads[1][name].middleCols(g * 8 + 4, 4);
    }
    // Absolute for b_k, whose gradient is 0 but for rounding (softmax ignores a shift of a
    // row's logits, and q·b_k shifts them all).
    CHECK((grad - expected).norm() < 1e-12 * std::max(1.0, expected.norm()));
  }
  CHECK_THROWS_WITH(Block({.d_model = 16, .heads = 4, .kv_heads = 3}),
                    Catch::Contains("'kv_heads'") && Catch::Contains("a divisor of heads = 4"));
}

TEMPLATE_TEST_CASE("Rotary positions and grouped key/value heads equal the naive reference",
                   "[mha][rotary][gqa]", float, double) {
  using S = TestType;
  using Block = MultiHeadAttention<FullAttention<S>, Causal>;
  const SequenceShape shape{2, 70, {70, 41}};
  Matrix<S> x(shape.tokens(), 32), y(shape.tokens(), 32);
  CounterRng(40).fill_normal(x);
  // All of each head's columns with RoPE's base; a quarter of them with another base; 4 query
  // heads over 2 key/value heads, and over 4.
  for (const auto& [rotary, kv] : {std::pair{Rotary{true, 10000.0, 0}, Index(2)},
                                   std::pair{Rotary{true, 500.0, 2}, Index(4)}}) {
    CAPTURE(rotary.base, kv);
    Block block({.d_model = 32,
                 .heads = 4,
                 .seed = 5,
                 .policy = {8, 16, {}},
                 .kv_heads = kv,
                 .rotary = rotary});
    randomise_biases(block, 3);
    block.forward(x, y, shape);
    const MatD expected = reference::multi_head_attention(
        x.template cast<double>(), x.template cast<double>(), weights_of(block), 4, 8, 8, shape,
        shape, true, 1.0 / std::sqrt(8.0), rotary.base, rotary.dims, kv);
    MatD got = y.template cast<double>();
    shape.zero_padding(got);
    MatD want = expected;
    shape.zero_padding(want);
    CHECK(reference::relative_error(got, want) < tolerance<S>());
  }
  // Bad settings and calls are Errors that name the setting.
  CHECK_THROWS_WITH(Block({.d_model = 32, .heads = 4, .rotary = {true, 10000.0, 3}}),
                    Catch::Contains("'rotary.dims'") && Catch::Contains("an even number"));
  CHECK_THROWS_WITH(Block({.d_model = 32, .heads = 4, .rotary = {true, 10000.0, 10}}),
                    Catch::Contains("at most d_head = 8"));
  CHECK_THROWS_WITH(Block({.d_model = 32, .heads = 4, .rotary = {true, 0.0, 0}}),
                    Catch::Contains("'rotary.base'"));
  MultiHeadAttention<FullAttention<S>> cross({.d_model = 32, .heads = 4, .rotary = {true}});
  CHECK_THROWS_WITH(cross.forward(x, x, y, shape, shape), Catch::Contains("cross-attention"));
}

TEST_CASE("MultiHeadAttention rejects bad input with a clear effattn::Error", "[mha][errors]") {
  using Block = MultiHeadAttention<FullAttention<float>>;
  CHECK_THROWS_WITH(Block({.d_model = 10, .heads = 3}),
                    Catch::Contains("MultiHeadAttention") && Catch::Contains("'heads'") &&
                        Catch::Contains("divisor of d_model = 10"));
  CHECK_THROWS_WITH(Block({.d_model = 0, .heads = 1}), Catch::Contains("'d_model'"));
  CHECK_THROWS_WITH(Block({.d_model = 8, .heads = 0}), Catch::Contains("'heads'"));
  CHECK_NOTHROW(Block({.d_model = 10, .heads = 3, .d_head = 4}));  // explicit d_head is fine

  Block block({.d_model = 8, .heads = 2});
  Matrix<float> x(12, 8), y(12, 8), wrong_width(12, 7), ctx(10, 8);
  x.setOnes();
  ctx.setOnes();
  CHECK_THROWS_WITH(block.forward(wrong_width, y, {2, 6}),
                    Catch::Contains("'x'") && Catch::Contains("d_model = 8 columns"));
  // A matrix of the wrong height is named, with the shape's count.
  CHECK_THROWS_WITH(block.forward(x, y, {2, 5}),
                    Catch::Contains("'x'") && Catch::Contains("shape's batch·seq = 2·5 = 10 rows"));
  CHECK_THROWS_WITH(block.forward(x, y, {2, 6, {6, 7}}),
                    Catch::Contains("shape.lengths[1]") && Catch::Contains("[0, 6]"));
  CHECK_THROWS_WITH(block.forward(x, y, {2, 6, {6}}), Catch::Contains("one length per sequence"));
  CHECK_THROWS_WITH(block.forward(x, wrong_width, {2, 6}), Catch::Contains("'y'"));
  CHECK_THROWS_WITH(block.forward(x, ctx, y, {2, 6}, {1, 10}), Catch::Contains("kv_shape.batch"));
  Matrix<float> empty(0, 8);
  CHECK_THROWS_WITH(block.forward(empty, empty, {1, 0}), Catch::Contains("shape.seq"));

  // A failed call leaves the block usable and unchanged.
  const auto before = weights_of(block).w_q;
  CHECK_NOTHROW(block.forward(x, y, {2, 6}));
  CHECK(weights_of(block).w_q == before);
}

namespace {
// FullAttention that rejects sequences longer than 8 (as a Linformer rejects n > n_max).
struct ShortOnly : FullAttention<double> {
  using FullAttention::FullAttention;
  void validate(Index n_q, Index n_k, Index d_k, Index d_v, bool causal) const {
    FullAttention::validate(n_q, n_k, d_k, d_v, causal);
    detail::require(n_k <= 8, "ShortOnly", "n_k", n_k, "at most 8");
  }
};
}  // namespace

TEST_CASE("A rejected forward leaves the last training forward's state intact", "[mha][errors]") {
  MultiHeadAttention<ShortOnly> block({.d_model = 4, .heads = 2, .seed = 9});
  const SequenceShape shape{1, 6}, longer{1, 10};
  Matrix<double> x(6, 4), y(6, 4), dy(6, 4), dx(6, 4), x_long(10, 4), y_long(10, 4);
  CounterRng(1).fill_normal(x);
  CounterRng(2).fill_normal(dy);
  CounterRng(3).fill_normal(x_long);
  block.set_training(true);

  block.forward(x, y, shape);
  block.backward(x, dy, dx, shape);
  const Matrix<double> dx_clean = dx;
  block.zero_grad();

  block.forward(x, y, shape);
  CHECK_THROWS_WITH(block.forward(x_long, y_long, longer), Catch::Contains("at most 8"));
  block.backward(x, dy, dx, shape);  // still the backward of the 6-token forward
  CHECK(dx == dx_clean);
}

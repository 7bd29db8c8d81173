// What a NaN or ∞ may reach, decided once (core/sequence_shape.hpp, attention/masking.hpp):
// padded rows reach no valid row and no parameter gradient, whatever they hold; in causal
// attention no output depends on a later token's values, so decoding equals the causal
// forward with non-finite tokens too.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

namespace {

template <class S>
std::vector<Matrix<S>> gradients_of(auto& model) {
  std::vector<Matrix<S>> out;
  model.visit_parameters([&](std::string_view, auto&, auto& g) { out.push_back(g); });
  return out;
}

template <class S>
void fill_padding(Matrix<S>& m, const SequenceShape& shape, S value) {
  for (Index b = 0; b < shape.batch; ++b)
    for (Index t = shape.valid_length(b); t < shape.seq; ++t)
      m.row(b * shape.seq + t).setConstant(value);
}

// The valid rows of m, one sequence after another.
template <class S>
Matrix<S> valid_rows(const Matrix<S>& m, const SequenceShape& shape) {
  Matrix<S> out(0, m.cols());
  shape.for_each_valid_run([&](Index r0, Index rows) {
    out.conservativeResize(out.rows() + rows, Eigen::NoChange);
    out.bottomRows(rows) = m.middleRows(r0, rows);
  });
  return out;
}

// A pre-norm encoder with attention policy P: outputs, dx and every parameter gradient on the
// valid rows are the same whether the padded rows of x and dy hold zeros, NaN or ∞.
template <class Attention>
void check_padding(typename Attention::Config attention) {
  using S = typename Attention::Scalar;
  using Ffn = Residual<PreNorm<Chunked<FeedForward<S>>>>;
  using Model = Sequential<Linear<S>, Residual<PreNorm<Attention>>, Ffn, LayerNorm<S>>;
  const Index d = attention.d_model;
  const SequenceShape shape{3, 24, {24, 17, 5}};
  auto run = [&](S padding, S dy_padding) {
    Model model(
        {.d_in = d, .d_out = d, .seed = 1}, {.layer = {.layer = attention}},
        {.layer = {.layer = {.layer = {.d_model = d, .d_ff = 2 * d, .seed = 2}, .chunk = 7}}},
        {.d_model = d});
    randomise(model, 3);
    Matrix<S> x = random<S>(shape.tokens(), d, 4), dy = random<S>(shape.tokens(), d, 5);
    fill_padding(x, shape, padding);
    fill_padding(dy, shape, dy_padding);
    Matrix<S> y(shape.tokens(), d), dx(shape.tokens(), d);
    model.set_training(true);
    model.zero_grad();
    model.forward(x, y, shape);
    model.backward(x, dy, dx, shape);
    return std::tuple{valid_rows(y, shape), valid_rows(dx, shape), gradients_of<S>(model)};
  };
  const auto [y0, dx0, g0] = run(S(0), S(0));
  for (const S bad : {std::numeric_limits<S>::quiet_NaN(), std::numeric_limits<S>::infinity()}) {
    CAPTURE(bad);
    const auto [y, dx, g] = run(bad, bad);
    CHECK(y.allFinite());
    CHECK(dx.allFinite());
    CHECK(y == y0);
    CHECK(dx == dx0);
    REQUIRE(g.size() == g0.size());
    for (std::size_t i = 0; i < g.size(); ++i) {
      CAPTURE(i);
      CHECK(g[i].allFinite());
      CHECK(g[i] == g0[i]);
    }
  }
}

}  // namespace

TEST_CASE("Padded rows reach no valid row and no gradient, whatever they hold", "[nan]") {
  const Index d = 8;
  check_padding<MultiHeadAttention<FullAttention<float>>>(
      {.d_model = d, .heads = 2, .seed = 1, .policy = {8, 16, {}}});
  check_padding<MultiHeadAttention<FullAttention<double>, Causal>>(
      {.d_model = d, .heads = 2, .seed = 1, .policy = {8, 16, {}}});
  check_padding<MultiHeadAttention<Favor<double>>>(
      {.d_model = d, .heads = 2, .seed = 1, .policy = {.features = 16, .chunk = 5}});
  check_padding<MultiHeadAttention<Favor<double>, Causal>>(
      {.d_model = d, .heads = 2, .seed = 1, .policy = {.features = 16, .chunk = 5}});
  check_padding<MultiHeadAttention<LSHAttention<double>>>(
      {.d_model = d, .heads = 2, .seed = 1, .policy = {.chunk = 4, .rounds = 2, .buckets = 4}});
  check_padding<MultiHeadAttention<LowRank<double, DenseProjection>>>(
      {.d_model = d, .heads = 2, .seed = 1, .policy = {.projection = {.k = 6, .n_max = 24}}});

  // The embedding's table gets nothing from padded positions.
  Embedding<double> emb({.vocab = 5, .d_model = 3});
  const std::vector<std::int32_t> ids{1, 2, 3, 4};
  Matrix<double> dy = random<double>(4, 3, 1);
  dy.row(3).setConstant(std::numeric_limits<double>::quiet_NaN());
  emb.backward(ids, dy, SequenceShape{2, 2, {2, 1}});
  emb.visit_parameters([&](std::string_view, auto&, auto& g) {
    CHECK(g.allFinite());
    CHECK(g.row(4).isZero());
    CHECK(g.row(1) == dy.row(0));
  });
}

namespace {

// Causal block B on one sequence whose token t holds `bad` in every feature: the rows before t
// equal those of the same sequence with a finite token t (no output depends on a later token),
// and decoding token by token gives what the forward gives, NaN pattern included.
template <class Block>
void check_causal(typename Block::Config config, double tol, bool decodes = true) {
  using S = typename Block::Scalar;
  const Index n = 50, d = config.d_model;
  Block block(config);
  randomise(block, 2);
  const SequenceShape shape{1, n, {}};
  const Matrix<S> x = random<S>(n, d, 3);
  Matrix<S> y0(n, d);
  block.forward(x, y0, shape);
  for (const Index t : {Index(7), Index(31), Index(49)})
    for (const S bad : {std::numeric_limits<S>::quiet_NaN(), std::numeric_limits<S>::infinity()}) {
      CAPTURE(t, bad);
      Matrix<S> xb = x, y(n, d);
      xb.row(t).setConstant(bad);
      block.forward(xb, y, shape);
      CHECK(y.topRows(t).allFinite());
      CHECK(reference::relative_error(y.topRows(t), y0.topRows(t)) < tol);
      if constexpr (requires { block.start_decoding(1); }) {
        if (!decodes) continue;
        auto decoder = block.start_decoding(1);
        Matrix<S> step(1, d), decoded(n, d);
        for (Index i = 0; i < n; ++i) {
          block.decode(xb.row(i), step, decoder);
          decoded.row(i) = step;
        }
        CHECK(reference::relative_error(decoded.topRows(t), y.topRows(t)) < tol);
        for (Index i = t; i < n; ++i)
          for (Index c = 0; c < d; ++c)
            CHECK(std::isnan(decoded(i, c)) == std::isnan(y(i, c)));
      }
    }
}

}  // namespace

TEST_CASE("Causal attention: no output depends on a later token's values, NaN or ∞", "[nan]") {
  // Small tiles: the non-finite token sits in a masked (diagonal) tile and in later ones.
  check_causal<MultiHeadAttention<FullAttention<float>, Causal>>(
      {.d_model = 16, .heads = 2, .seed = 1, .policy = {12, 16, {}}}, 1e-5);
  check_causal<MultiHeadAttention<FullAttention<float>, Causal>>(
      {.d_model = 16, .heads = 2, .seed = 1}, 1e-5);
  check_causal<MultiHeadAttention<FullAttention<double>, Causal>>(
      {.d_model = 8, .heads = 2, .seed = 1, .policy = {8, 16, {}}}, 1e-12);
  check_causal<MultiHeadAttention<Favor<double>, Causal>>(
      {.d_model = 8, .heads = 2, .seed = 1, .policy = {.features = 16, .chunk = 16}}, 1e-12);
  check_causal<MultiHeadAttention<Favor<float>, Causal>>(
      {.d_model = 16, .heads = 2, .seed = 1, .policy = {.features = 32}}, 1e-5);
}

TEST_CASE("Causal LSH: a later token's NaN or ∞ reaches no earlier row", "[nan]") {
  // A later token may change the buckets, and so the chunks, of earlier ones (LSH hashes the
  // whole sequence): what holds is that its values never reach them.
  using Block = MultiHeadAttention<LSHAttention<double>, Causal>;
  Block block(
      {.d_model = 8, .heads = 2, .seed = 1, .policy = {.chunk = 4, .rounds = 2, .buckets = 4}});
  randomise(block, 2);
  const Index n = 40;
  const Matrix<double> x = random<double>(n, 8, 3);
  for (const Index t : {Index(5), Index(21), Index(39)}) {
    Matrix<double> xb = x, y(n, 8);
    xb.row(t).setConstant(std::numeric_limits<double>::quiet_NaN());
    block.forward(xb, y, SequenceShape{1, n, {}});
    CAPTURE(t);
    CHECK(y.topRows(t).allFinite());
  }
}

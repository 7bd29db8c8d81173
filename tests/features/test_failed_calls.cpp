// What a rejected call leaves behind, and the one aliasing rule: every bad call throws
// effattn::Error before anything changes (stacks check every block before the first one
// runs), backward checks the shape and padding of its forward, and no call works in place.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "effattn/effattn.hpp"
#include "reference.hpp"

using namespace effattn;
using Catch::Contains;

namespace {

template <class S>
Matrix<S> random(Index rows, Index cols, std::uint64_t seed) {
  Matrix<S> m(rows, cols);
  CounterRng(seed).fill_normal(m);
  return m;
}

// Every parameter gradient of a layer, in visiting order.
template <class L>
std::vector<Matrix<double>> gradients(L& layer) {
  std::vector<Matrix<double>> out;
  layer.visit_parameters([&](std::string_view, auto&, Matrix<double>& g) { out.push_back(g); });
  return out;
}

// Training forward, backward, gradients: what a model that never saw a bad call gives.
template <class L>
std::vector<Matrix<double>> clean_gradients(L& layer, const Matrix<double>& x,
                                            const Matrix<double>& dy, const SequenceShape& shape,
                                            Matrix<double>& dx) {
  Matrix<double> y(x.rows(), layer.d_out());
  layer.set_training(true);
  layer.zero_grad();
  layer.forward(x, y, shape);
  layer.backward(x, dy, dx, shape);
  return gradients(layer);
}

using Attention = MultiHeadAttention<FullAttention<double>>;
using Stack =
    Sequential<Residual<FeedForward<double>>, LayerNorm<double>, Attention, FeedForward<double>>;

Stack make_stack() {
  return Stack({.layer = {.d_model = 6, .d_ff = 8}}, {.d_model = 6},
               {.d_model = 6, .heads = 2, .seed = 3}, {.d_model = 6, .d_ff = 8});
}

}  // namespace

TEST_CASE("Stack backward with a shape a lower block rejects changes no gradient or activation",
          "[failed_calls][stack]") {
  // 12 rows as 2·6 in forward, 3·4 in backward: the blocks above the attention accept any
  // split of the rows; the attention block must refuse before any block has run.
  const SequenceShape shape{2, 6, {6, 4}}, other{3, 4, {}};
  const Matrix<double> x = random<double>(12, 6, 1), dy = random<double>(12, 6, 2);
  Stack reference_model = make_stack(), model = make_stack();
  Matrix<double> dx_clean(12, 6), dx(12, 6);
  const auto expected = clean_gradients(reference_model, x, dy, shape, dx_clean);

  Matrix<double> y(12, 6);
  model.set_training(true);
  model.zero_grad();
  model.forward(x, y, shape);
  const std::size_t held = model.activation_bytes();
  CHECK_THROWS_WITH(model.backward(x, dy, dx, other),
                    Contains("MultiHeadAttention") || Contains("AttentionCore"));
  CHECK(model.activation_bytes() == held);
  for (const auto& g : gradients(model))
    CHECK(g.isZero(0));
  model.backward(x, dy, dx, shape);  // the correct retry works and gives the clean result
  CHECK(dx == dx_clean);
  const auto got = gradients(model);
  REQUIRE(got.size() == expected.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    CHECK(got[i] == expected[i]);
}

TEST_CASE("A training forward rejected by a block above the first keeps the last forward",
          "[failed_calls][stack]") {
  using Linformer = MultiHeadAttention<LowRank<double>>;
  using Model = Sequential<LayerNorm<double>, Linformer>;
  const LayerNorm<double>::Config norm{.d_model = 4};
  const Linformer::Config attention{
      .d_model = 4, .heads = 2, .seed = 5, .policy = {.projection = {.k = 4, .n_max = 8}}};
  const SequenceShape shape{1, 8, {}}, too_long{1, 16, {}};
  const Matrix<double> x = random<double>(8, 4, 3), dy = random<double>(8, 4, 4);
  Model reference_model(norm, attention), model(norm, attention);
  Matrix<double> dx_clean(8, 4), dx(8, 4), y(8, 4), y_long(16, 4);
  const auto expected = clean_gradients(reference_model, x, dy, shape, dx_clean);

  model.set_training(true);
  model.zero_grad();
  model.forward(x, y, shape);
  const Matrix<double> x_long = random<double>(16, 4, 5);
  CHECK_THROWS_WITH(model.forward(x_long, y_long, too_long), Contains("n_max = 8"));
  model.backward(x, dy, dx, shape);  // backward of the forward that succeeded
  CHECK(dx == dx_clean);
  const auto got = gradients(model);
  for (std::size_t i = 0; i < got.size(); ++i)
    CHECK(got[i] == expected[i]);
}

TEST_CASE("Backward checks the padding of its forward", "[failed_calls][mha]") {
  const SequenceShape shape{2, 6, {6, 4}};
  Attention block({.d_model = 6, .heads = 2, .seed = 7});
  const Matrix<double> x = random<double>(12, 6, 1), dy = random<double>(12, 6, 2);
  Matrix<double> y(12, 6), dx(12, 6);
  block.set_training(true);
  block.forward(x, y, shape);
  CHECK_THROWS_WITH(block.backward(x, dy, dx, SequenceShape{2, 6, {6, 5}}),
                    Contains("argument 'shape.lengths[1]'") || Contains("lengths[1]"));
  CHECK_THROWS_WITH(block.backward(x, dy, dx, SequenceShape{2, 6, {}}), Contains("lengths[1]"));
  CHECK_THROWS_WITH(block.backward(x, dy, dx, SequenceShape{3, 4, {}}), Contains("batch"));
  for (const auto& g : gradients(block))
    CHECK(g.isZero(0));
  CHECK_NOTHROW(block.backward(x, dy, dx, shape));
}

TEST_CASE("No call works in place: an output sharing memory with an input is an Error",
          "[failed_calls][aliasing]") {
  const SequenceShape shape{1, 6, {}};
  Matrix<float> m = random<float>(6, 8, 1), dy = random<float>(6, 4, 2);
  const auto rejects = [&](auto&& call) {
    CHECK_THROWS_WITH(call(), Contains("shares memory with"));
  };
  LayerNorm<float> norm({.d_model = 4});
  FeedForward<float> ff({.d_model = 4, .d_ff = 8});
  Residual<FeedForward<float>> residual({.layer = {.d_model = 4, .d_ff = 8}});
  PreNorm<FeedForward<float>> pre_norm({.layer = {.d_model = 4, .d_ff = 8}});
  Chunked<FeedForward<float>> chunked({.layer = {.d_model = 4, .d_ff = 8}, .chunk = 4});
  MultiHeadAttention<FullAttention<float>> attention({.d_model = 4, .heads = 2});
  Repeat<FeedForward<float>> stack({.block = {.d_model = 4, .d_ff = 8}, .depth = 2});
  const auto x = m.leftCols(4);
  auto each = [&](auto& layer) {
    CAPTURE(typeid(layer).name());
    layer.set_training(true);
    rejects([&] { layer.forward(x, m.leftCols(4), shape); });        // y = x
    rejects([&] { layer.forward(x, m.block(0, 2, 6, 4), shape); });  // overlapping columns
    layer.forward(m.leftCols(4), m.rightCols(4), shape);             // side by side: allowed
    rejects([&] { layer.backward(x, dy, dy, shape); });              // dx = dy
    rejects([&] { layer.backward(x, dy, m.leftCols(4), shape); });   // dx = x
    Matrix<float> dx(6, 4);
    CHECK_NOTHROW(layer.backward(x, dy, dx, shape));
  };
  each(norm);
  each(ff);
  each(residual);
  each(pre_norm);
  each(chunked);
  each(attention);
  each(stack);

  // Reversible: a view that overlaps the input partly (one row shifted) is refused too.
  Reversible<FeedForward<float>, FeedForward<float>> rev(
      {.f = {.d_model = 2, .d_ff = 4, .seed = 1}, .g = {.d_model = 2, .d_ff = 4, .seed = 2}});
  Matrix<float> tall = random<float>(7, 4, 3);
  rejects([&] { rev.forward(tall.topRows(6), tall.bottomRows(6), shape); });
  Matrix<float> rev_x = tall.topRows(6), rev_y(6, 4), rev_dx(6, 4);
  rev.forward(rev_x, rev_y, shape);
  const Matrix<float> rev_dy = random<float>(6, 4, 4);
  rejects([&] { rev.backward_from_output(rev_y, rev_dy, rev_x, rev_x, shape); });  // x = dx
  rejects([&] { rev.inverse(rev_y, rev_y, shape); });

  // Cross-attention: y must not share memory with the context either.
  MultiHeadAttention<FullAttention<float>> cross({.d_model = 4, .heads = 2, .d_context = 4});
  Matrix<float> q = random<float>(6, 4, 5), context = random<float>(6, 4, 6);
  rejects([&] { cross.forward(q, context, context, shape, shape); });
}

TEST_CASE("A batch·seq that overflows is an Error at the block, not an out-of-range index",
          "[failed_calls][shape]") {
  MultiHeadAttention<FullAttention<float>> block({.d_model = 4, .heads = 2});
  Matrix<float> x = random<float>(8, 4, 1), y(8, 4);
  const Index huge = (Index(1) << 61) + 1;  // ·8 wraps to 8 rows
  CHECK_THROWS_WITH(block.forward(x, y, SequenceShape{huge, 8, {}}), Contains("overflows"));
  Matrix<float> q(8, 4), out(8, 4);
  AttentionCore<FullAttention<float>> core({}, HeadLayout{2, 2, 2, 0});
  CHECK_THROWS_WITH(
      core.forward(q, q, q, out, SequenceShape{huge, 8, {}}, SequenceShape{huge, 8, {}}, false),
      Contains("overflows"));
}

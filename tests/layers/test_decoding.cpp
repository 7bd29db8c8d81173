// Incremental decoding: token by token, or a few tokens at a time, equals the causal forward
// over the whole sequences (FullAttention's key/value cache, Favor's recurrent state).
#include <catch2/catch.hpp>

#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

namespace {
// Decodes x ([batch·n × d], sequence-major) in pieces of the given sizes and returns the
// outputs in x's layout.
template <class Block>
Matrix<typename Block::Scalar> decode_in_pieces(Block& block,
                                                const Matrix<typename Block::Scalar>& x,
                                                Index batch, const std::vector<Index>& pieces) {
  using S = typename Block::Scalar;
  const Index n = x.rows() / batch, d = x.cols();
  Matrix<S> y(x.rows(), d);
  auto decoder = block.start_decoding(batch);
  Index t = 0;
  for (const Index m : pieces) {
    Matrix<S> xs(batch * m, d), ys(batch * m, d);
    for (Index b = 0; b < batch; ++b)
      xs.middleRows(b * m, m) = x.middleRows(b * n + t, m);
    block.decode(xs, ys, decoder);
    for (Index b = 0; b < batch; ++b)
      y.middleRows(b * n + t, m) = ys.middleRows(b * m, m);
    t += m;
  }
  CHECK(t == n);
  if constexpr (requires { decoder.length; }) CHECK(decoder.length == n);
  return y;
}

template <class Block>
void check_decoding(Block& block, double tol) {
  using S = typename Block::Scalar;
  const Index batch = 2, n = 13, d = block.d_in();
  const SequenceShape shape{batch, n, {}};
  const Matrix<S> x = random<S>(batch * n, d, 5);
  Matrix<S> y(batch * n, d);
  block.forward(x, y, shape);
  std::vector<Index> ones(n, 1);
  CHECK(reference::relative_error(decode_in_pieces(block, x, batch, ones), y) < tol);
  CHECK(reference::relative_error(decode_in_pieces(block, x, batch, {4, 1, 6, 2}), y) < tol);
  CHECK(reference::relative_error(decode_in_pieces(block, x, batch, {n}), y) < tol);
}
}  // namespace

TEST_CASE("Decoding with FullAttention's key/value cache equals the causal forward", "[layers]") {
  MultiHeadAttention<FullAttention<double>, Causal> exact({.d_model = 12, .heads = 3, .seed = 1});
  randomise(exact, 2);
  check_decoding(exact, 1e-13);
  MultiHeadAttention<FullAttention<float>, Causal> fast({.d_model = 64, .heads = 2, .seed = 1});
  check_decoding(fast, 2e-6);
}

TEST_CASE("A block's window sized at run time decodes as its forward, as one sized in its type",
          "[layers][window]") {
  using RunTime = MultiHeadAttention<FullAttention<double>, CausalWindow<>>;
  RunTime run_time({.d_model = 12, .heads = 3, .seed = 1, .masking = CausalWindow<>{4}});
  randomise(run_time, 2);
  check_decoding(run_time, 1e-13);
  // The same block with the size in its type, and without a window: the same bits as the one,
  // not the other (13 tokens, so most rows miss keys).
  MultiHeadAttention<FullAttention<double>, CausalWindow<4>> in_type(
      {.d_model = 12, .heads = 3, .seed = 1});
  MultiHeadAttention<FullAttention<double>, Causal> whole({.d_model = 12, .heads = 3, .seed = 1});
  randomise(in_type, 2);
  randomise(whole, 2);
  const SequenceShape shape{2, 13, {}};
  const Matrix<double> x = random<double>(26, 12, 5);
  Matrix<double> a(26, 12), b(26, 12), c(26, 12);
  run_time.forward(x, a, shape);
  in_type.forward(x, b, shape);
  whole.forward(x, c, shape);
  CHECK((a.array() == b.array()).all());
  CHECK(reference::relative_error(a, c) > 1e-3);
  CHECK_THROWS_WITH(RunTime({.d_model = 12, .heads = 3}),
                    Catch::Contains("MultiHeadAttention") && Catch::Contains("masking.size") &&
                        Catch::Contains("CausalWindow<>{512}"));
}

TEST_CASE("Grouped key/value heads decode as their forward computes", "[layers][gqa]") {
  // One cache per key/value head, serving its two query heads (Full); Favor keeps a state per
  // query head (its features are the query head's), fed the key/value head's keys and values.
  MultiHeadAttention<FullAttention<double>, Causal> full(
      {.d_model = 16, .heads = 4, .seed = 1, .kv_heads = 2});
  randomise(full, 2);
  check_decoding(full, 1e-13);
  auto decoder = full.start_decoding(3);
  CHECK(decoder.states.size() == 3 * 2);
  MultiHeadAttention<Favor<double>, Causal> favor({.d_model = 16,
                                                   .heads = 4,
                                                   .seed = 1,
                                                   .policy = {.features = 16, .chunk = 4},
                                                   .kv_heads = 1});
  check_decoding(favor, 1e-12);
}

TEST_CASE("Rotary positions decode as their forward computes", "[layers][rotary]") {
  // Each new token rotated at its position (the tokens decoded so far), with grouped heads.
  MultiHeadAttention<FullAttention<double>, Causal> full(
      {.d_model = 16, .heads = 4, .seed = 1, .kv_heads = 2, .rotary = {true}});
  randomise(full, 2);
  check_decoding(full, 1e-13);
  // Before Favor's feature map, as performer-pytorch recommends.
  MultiHeadAttention<Favor<double>, Causal> favor({.d_model = 16,
                                                   .heads = 4,
                                                   .seed = 1,
                                                   .policy = {.features = 16, .chunk = 4},
                                                   .rotary = {true, 10000.0, 2}});
  check_decoding(favor, 1e-12);
}

TEST_CASE("Decoding with Favor's recurrent state equals the causal forward", "[layers]") {
  using Block = MultiHeadAttention<Favor<double>, Causal>;
  Block favor({.d_model = 12, .heads = 3, .seed = 1, .policy = {.features = 16, .chunk = 4}});
  check_decoding(favor, 1e-12);
  // The state does not grow with the prefix: O(features · d_v) per head.
  auto decoder = favor.start_decoding(1);
  const std::size_t empty = decoder.bytes();
  Matrix<double> xs = random<double>(1, 12, 3), ys(1, 12);
  for (int t = 0; t < 50; ++t)
    favor.decode(xs, ys, decoder);
  CHECK(decoder.bytes() == empty);
  CHECK(decoder.length == 50);
  MultiHeadAttention<Favor<float>, Causal> fast({.d_model = 64, .heads = 2, .seed = 1});
  check_decoding(fast, 1e-5);
}

TEST_CASE("A bad decode call is an Error and leaves the decoder as it was", "[layers]") {
  MultiHeadAttention<FullAttention<double>, Causal> block({.d_model = 8, .heads = 2, .seed = 1});
  auto decoder = block.start_decoding(2);
  Matrix<double> x = random<double>(4, 8, 1), y(4, 8);
  block.decode(x, y, decoder);
  CHECK(decoder.length == 2);
  const std::size_t bytes = decoder.bytes();
  Matrix<double> odd = random<double>(3, 8, 2), y3(3, 8);
  CHECK_THROWS_AS(block.decode(odd, y3, decoder), Error);  // 3 rows for 2 sequences
  Matrix<double> narrow(4, 7);
  CHECK_THROWS_AS(block.decode(narrow, y, decoder), Error);
  CHECK(decoder.length == 2);
  CHECK(decoder.bytes() == bytes);
  CHECK_THROWS_AS(block.start_decoding(0), Error);
}

namespace {
using AttnD = Residual<PreNorm<MultiHeadAttention<FullAttention<double>, Causal>>>;
using FeedD = Residual<PreNorm<Chunked<FeedForward<double>>>>;
using BlockD = Sequential<AttnD, FeedD>;
// A GPT-style causal language model body: positions, pre-norm blocks, a final norm.
using CausalLM = Sequential<SinusoidalPositions<double>, Repeat<BlockD, 2>, LayerNorm<double>>;

CausalLM causal_lm(Index d) {
  const BlockD::Config block{
      {AttnD::Config{.layer = {.layer = {.d_model = d, .heads = 3, .seed = 1}}},
       FeedD::Config{.layer = {.layer = {.layer = {.d_model = d, .d_ff = 2 * d}, .chunk = 5}}}}};
  CausalLM lm({.d_model = d}, {.block = block}, {.d_model = d});
  randomise(lm, 3);
  return lm;
}
}  // namespace

TEST_CASE("A whole causal model decodes token by token as its causal forward", "[layers]") {
  CausalLM lm = causal_lm(12);
  check_decoding(lm, 1e-12);
  // A reversible Performer with learned positions and (switched off) dropout.
  using Attn = PreNorm<Sequential<MultiHeadAttention<Favor<double>, Causal>, Dropout<double>>>;
  using Feed = PreNorm<FeedForward<double>>;
  using Model = Sequential<LearnedPositions<double>, Duplicate<double>,
                           Repeat<Reversible<Attn, Feed>>, MergeHalves<double>>;
  const Index d = 8;
  const Attn::Config attn{
      .layer = {{MultiHeadAttention<Favor<double>, Causal>::Config{
                     .d_model = d, .heads = 2, .policy = {.features = 8, .chunk = 3}},
                 Dropout<double>::Config{.d_model = d, .rate = 0.5}}}};
  Model model({.d_model = d, .max_positions = 13}, {.d_model = d},
              {.block = {.f = attn, .g = {.layer = {.d_model = d, .d_ff = 16}}}, .depth = 3},
              {.d_model = d, .merge = Merge::mean});
  randomise(model, 4);
  check_decoding(model, 1e-11);
}

TEST_CASE("A model's bad decode call is an Error and leaves every decoder as it was", "[layers]") {
  CausalLM lm = causal_lm(12);
  auto decoder = lm.start_decoding(2);
  Matrix<double> x = random<double>(4, 12, 1), y(4, 12);
  lm.decode(x, y, decoder);
  auto& positions = std::get<0>(decoder);
  auto& first_attention = std::get<1>(decoder)[0];
  CHECK(positions.length == 2);
  CHECK(std::get<0>(first_attention).length == 2);
  Matrix<double> odd = random<double>(3, 12, 2), y3(3, 12);
  CHECK_THROWS_AS(lm.decode(odd, y3, decoder), Error);  // 3 rows for 2 sequences
  Matrix<double> narrow(4, 11);
  CHECK_THROWS_AS(lm.decode(narrow, y, decoder), Error);
  lm.set_training(true);  // decoding would replace what the training forward keeps
  CHECK_THROWS_AS(lm.decode(x, y, decoder), Error);
  lm.set_training(false);
  CHECK(positions.length == 2);
  CHECK(std::get<0>(first_attention).length == 2);
  lm.decode(x, y, decoder);  // and it goes on
  CHECK(std::get<0>(first_attention).length == 4);

  // Past a learned table's last position.
  LearnedPositions<double> table({.d_model = 4, .max_positions = 3});
  auto steps = table.start_decoding(1);
  Matrix<double> one = random<double>(2, 4, 3), out(2, 4);
  table.decode(one, out, steps);
  CHECK_THROWS_AS(table.decode(one, out, steps), Error);  // positions 2, 3 of 3
  CHECK(steps.length == 2);
  CHECK(table.offset == 0);
}

TEST_CASE("A decoder made by another block is an Error, whatever its shapes", "[layers]") {
  using Exact = MultiHeadAttention<FullAttention<double>, Causal>;
  using Performer = MultiHeadAttention<Favor<double>, Causal>;
  Exact block({.d_model = 8, .heads = 2, .seed = 1});
  Matrix<double> x = random<double>(2, 8, 1), y(2, 8);
  auto check_refused = [&](auto& b, auto& foreign) {
    const auto length = foreign.length;
    try {
      b.decode(x, y, foreign);
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(e.argument() == "decoder");
      CHECK(std::string(e.what()).find("another block") != std::string::npos);
    }
    CHECK(foreign.length == length);
  };
  // Same type: other head sizes (read out of bounds before), or the very same shapes.
  Exact wider({.d_model = 8, .heads = 1, .seed = 1});
  Exact twin({.d_model = 8, .heads = 2, .seed = 1});
  for (Exact* other : {&wider, &twin}) {
    auto foreign = other->start_decoding(2);
    check_refused(block, foreign);
  }
  auto mine = block.start_decoding(2);
  Performer favor({.d_model = 8, .heads = 2, .policy = {.features = 8}});
  Performer more_features({.d_model = 8, .heads = 2, .policy = {.features = 16}});
  auto foreign = more_features.start_decoding(2);
  check_refused(favor, foreign);
  decltype(mine) made_by_nobody;
  CHECK_THROWS_AS(block.decode(x, y, made_by_nobody), Error);
  block.decode(x, y, mine);  // its own decoder works
  CHECK(mine.length == 1);
}

TEST_CASE("A stack checks every block before any decoder moves", "[layers]") {
  using Attn = MultiHeadAttention<FullAttention<double>, Causal>;
  using Model = Sequential<Attn, LearnedPositions<double>, Residual<PreNorm<FeedForward<double>>>>;
  Model model({.d_model = 8, .heads = 2, .seed = 1}, {.d_model = 8, .max_positions = 3},
              {.layer = {.layer = {.d_model = 8, .d_ff = 16}}});
  randomise(model, 2);
  auto decoder = model.start_decoding(1);
  const Matrix<double> x = random<double>(4, 8, 3);
  Matrix<double> y(2, 8), y_one(1, 8);
  model.decode(x.topRows(2), y, decoder);
  // The positions (second block) refuse tokens 2 and 3 of a table of 3: the attention (first
  // block) must not have taken them into its cache.
  CHECK_THROWS_AS(model.decode(x.middleRows(2, 2), y, decoder), Error);
  CHECK(std::get<0>(decoder).length == 2);
  CHECK(std::get<1>(decoder).length == 2);
  // A later block in training mode refuses too, and nothing moves.
  model.get<2>().set_training(true);
  CHECK_THROWS_AS(model.decode(x.middleRows(2, 1), y_one, decoder), Error);
  CHECK(std::get<0>(decoder).length == 2);
  model.get<2>().set_training(false);
  // The retry gives what the forward over the three tokens gives.
  model.decode(x.middleRows(2, 1), y_one, decoder);
  Matrix<double> full(3, 8);
  model.forward(x.topRows(3), full, SequenceShape{1, 3, {}});
  CHECK(reference::relative_error(y_one, full.bottomRows(1)) < 1e-12);
}

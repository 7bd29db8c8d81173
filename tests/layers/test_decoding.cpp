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
  CHECK(decoder.length == n);
  return y;
}

template <class Block>
void check_decoding(Block& block, double tol) {
  using S = typename Block::Scalar;
  const Index batch = 2, n = 13, d = block.d_model();
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

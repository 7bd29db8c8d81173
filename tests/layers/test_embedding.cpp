// Embedding: rows of its table, gradients equal to the dense one-hot product, sparse
// zero_grad, and ids out of range rejected before anything is written.
#include <catch2/catch.hpp>

#include <cstdint>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

TEST_CASE("Embedding looks up rows and accumulates their gradients as a one-hot product",
          "[layers]") {
  Embedding<double> emb({.vocab = 10, .d_model = 4, .seed = 1});
  const std::vector<std::int32_t> ids{3, 7, 3, 0, 9, 3};
  Matrix<double> y(6, 4);
  emb.forward(ids, y);
  MatD onehot = MatD::Zero(6, 10);
  for (std::size_t t = 0; t < ids.size(); ++t)
    onehot(Index(t), ids[t]) = 1;
  CHECK(reference::relative_error(y, onehot * emb.table()) < 1e-15);

  const Matrix<double> dy = random<double>(6, 4, 2);
  emb.backward(ids, dy);
  emb.backward(ids, dy);  // gradients add up
  const MatD expected = 2.0 * onehot.transpose() * dy;
  CHECK(reference::relative_error(gradients(emb)[0], expected) < 1e-15);
  CHECK(parameter_paths(emb) == std::vector<std::string>{"table"});

  emb.zero_grad();
  CHECK(gradients(emb)[0].isZero(0));
  // More tokens than the vocabulary: zero_grad clears the whole table.
  std::vector<std::int32_t> many(25);
  for (std::size_t t = 0; t < many.size(); ++t)
    many[t] = std::int32_t(t % 10);
  emb.backward(many, random<double>(25, 4, 3));
  CHECK(!gradients(emb)[0].isZero(0));
  emb.zero_grad();
  CHECK(gradients(emb)[0].isZero(0));
}

TEST_CASE("Embedding rejects ids out of range before writing", "[layers]") {
  Embedding<float> emb({.vocab = 5, .d_model = 3});
  const std::vector<std::int32_t> ids{1, 5, 2};
  Matrix<float> y = Matrix<float>::Constant(3, 3, 7.0f);
  try {
    emb.forward(ids, y);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(e.component() == "Embedding");
    CHECK(e.argument() == "ids[1]");
  }
  CHECK((y.array() == 7.0f).all());
  CHECK_THROWS_AS(emb.backward(std::vector<std::int32_t>{-1, 0, 0}, y), Error);
  CHECK(gradients(emb)[0].isZero(0));
  CHECK_THROWS_AS(emb.forward(std::vector<std::int32_t>{1, 2}, y), Error);  // rows
  CHECK_THROWS_AS(Embedding<float>({.vocab = 0}), Error);
}

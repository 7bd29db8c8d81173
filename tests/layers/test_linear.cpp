// Linear against a naive double reference and finite differences.
#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

TEST_CASE("Linear matches a naive double reference, forward and backward", "[layers]") {
  for (const bool bias : {true, false}) {
    CAPTURE(bias);
    Linear<double> linear({.d_in = 5, .d_out = 7, .bias = bias, .seed = 2});
    randomise(linear, 4);
    const SequenceShape shape{2, 3, {}};
    const Matrix<double> x = random<double>(6, 5, 1);
    Matrix<double> y(6, 7);
    linear.forward(x, y, shape);
    const auto p = parameters(linear);
    MatD expected(6, 7);
    for (Index t = 0; t < 6; ++t)
      for (Index o = 0; o < 7; ++o) {
        double s = bias ? p.at("b")(0, o) : 0.0;
        for (Index i = 0; i < 5; ++i)
          s += x(t, i) * p.at("w")(i, o);
        expected(t, o) = s;
      }
    CHECK(reference::relative_error(y, expected) < 1e-14);
    CHECK(parameter_paths(linear) ==
          (bias ? std::vector<std::string>{"w", "b"} : std::vector<std::string>{"w"}));
    check_gradients(linear, x, shape);

    Linear<float> linear_f({.d_in = 5, .d_out = 7, .bias = bias, .seed = 2});
    randomise(linear_f, 4);
    Matrix<float> y_f(6, 7);
    linear_f.forward(x.cast<float>(), y_f, shape);
    CHECK(reference::relative_error(y_f, expected) < 1e-5);
  }
  CHECK_THROWS_AS(Linear<float>({.d_in = 0}), Error);
  Linear<float> linear({.d_in = 4, .d_out = 3});
  Matrix<float> x(2, 5), y(2, 3);
  CHECK_THROWS_AS(linear.forward(x, y, {1, 2, {}}), Error);
}

TEST_CASE("A Linear head tied to an Embedding uses and trains the embedding's table", "[layers]") {
  // ids → embedding → tied head → loss = Σ logits ⊙ g: the table gets gradient through both.
  Embedding<double> emb({.vocab = 7, .d_model = 4, .seed = 1});
  Linear<double> head({.d_in = 4, .d_out = 7, .seed = 2});
  randomise(head, 3);
  head.tie(emb);
  CHECK(head.tied());
  CHECK(parameter_paths(head) == std::vector<std::string>{"b"});
  CHECK(head.weight() == emb.table().transpose());
  const std::vector<std::int32_t> ids{2, 5, 2, 0, 6};
  const SequenceShape shape{1, 5, {}};
  const Matrix<double> g = random<double>(5, 7, 4);
  Matrix<double> x(5, 4), y(5, 7), dx(5, 4);
  auto loss = [&] {
    emb.forward(ids, x);
    head.forward(x, y, shape);
    return y.cwiseProduct(g).sum();
  };
  loss();
  MatD expected = x * emb.table().transpose();
  expected.rowwise() += parameters(head).at("b").row(0);
  CHECK(reference::relative_error(y, expected) < 1e-15);

  Matrix<double> table = emb.table();
  const MatD numeric = reference::numeric_gradient(
      [&] {
        emb.visit_parameters([&](std::string_view, auto& w, auto&) { w = table; });
        return loss();
      },
      table);
  emb.visit_parameters([&](std::string_view, auto& w, auto&) { w = table; });
  loss();
  head.backward(x, g, dx, shape);
  emb.backward(ids, dx);
  CHECK(reference::gradient_error(gradients(emb)[0], numeric) < 1e-8);
  emb.zero_grad();  // the head wrote every row: all are cleared
  CHECK(gradients(emb)[0].isZero(0));

  Embedding<double> other({.vocab = 8, .d_model = 4});
  CHECK_THROWS_AS(head.tie(other), Error);
}

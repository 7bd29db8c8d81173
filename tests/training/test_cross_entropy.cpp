// Softmax cross-entropy against a naive double reference and finite differences, and the
// chunked form through an output head against the unchunked one.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include "effattn/effattn.hpp"
#include "effattn/training/cross_entropy.hpp"
#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

namespace {
// Mean over counted rows of −Σ_j q_j log softmax(z)_j, q = (1 − ε)·one-hot + ε/V.
double naive_loss(const MatD& z, const std::vector<std::int32_t>& y, double eps,
                  std::int32_t ignore, Index* counted = nullptr, Index* correct = nullptr) {
  double sum = 0;
  Index n = 0, right = 0;
  for (Index r = 0; r < z.rows(); ++r) {
    if (y[std::size_t(r)] == ignore) continue;
    double lse = 0;
    for (Index j = 0; j < z.cols(); ++j)
      lse += std::exp(z(r, j));
    lse = std::log(lse);
    for (Index j = 0; j < z.cols(); ++j) {
      const double q = (j == y[std::size_t(r)] ? 1 - eps : 0.0) + eps / double(z.cols());
      sum -= q * (z(r, j) - lse);
    }
    Index best = 0;
    z.row(r).maxCoeff(&best);
    right += best == y[std::size_t(r)];
    ++n;
  }
  if (counted) *counted = n;
  if (correct) *correct = right;
  return n > 0 ? sum / double(n) : 0.0;
}
}  // namespace

TEST_CASE("softmax_cross_entropy matches a naive reference, with ignored targets and smoothing",
          "[training]") {
  const Index n = 9, vocab = 13;
  const MatD z = random<double>(n, vocab, 1, 2.0);
  std::vector<std::int32_t> y{4, -100, 0, 12, 7, 7, -100, 3, 1};
  for (const double eps : {0.0, 0.1}) {
    CAPTURE(eps);
    const CrossEntropyConfig config{.label_smoothing = eps};
    Index counted = 0, correct = 0;
    const double expected = naive_loss(z, y, eps, -100, &counted, &correct);
    Matrix<double> d(n, vocab);
    const auto result = softmax_cross_entropy<double>(z, y, d, config);
    CHECK(result.mean() == Approx(expected).epsilon(1e-13));
    CHECK(result.counted == counted);
    CHECK(result.correct == correct);
    // Gradient of the mean loss by finite differences (ignored rows get 0).
    Matrix<double> zz = z;
    const MatD numeric =
        reference::numeric_gradient([&] { return naive_loss(zz, y, eps, -100); }, zz);
    CHECK(reference::gradient_error(d, numeric) < 1e-8);
    CHECK(d.row(1).isZero(0));

    // float, in place, and without a gradient.
    Matrix<float> zf = z.cast<float>();
    const auto in_place = softmax_cross_entropy<float>(zf, y, zf, config);
    CHECK(in_place.mean() == Approx(expected).epsilon(1e-5));
    CHECK(reference::relative_error(zf, d) < 1e-5);
    CHECK(softmax_cross_entropy<double>(z, y, config).mean() == Approx(expected).epsilon(1e-13));
  }
  // A normaliser: the mean over another count (a whole batch).
  Matrix<double> d(n, vocab), d2(n, vocab);
  softmax_cross_entropy<double>(z, y, d);
  softmax_cross_entropy<double>(z, y, d2, {}, 14.0);
  CHECK(reference::relative_error(d2, d * (7.0 / 14.0)) < 1e-14);
}

TEST_CASE("Bad targets and settings are errors raised before anything is written", "[training]") {
  const MatD z = random<double>(4, 5, 2);
  Matrix<double> d = Matrix<double>::Constant(4, 5, 3.0);
  try {
    softmax_cross_entropy<double>(z, std::vector<std::int32_t>{0, 1, 5, 2}, d);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(e.component() == "softmax_cross_entropy");
    CHECK(e.argument() == "targets[2]");
  }
  CHECK((d.array() == 3.0).all());
  const std::vector<std::int32_t> y{0, 1, 2, 3};
  CHECK_THROWS_AS(softmax_cross_entropy<double>(z, y, d, {.label_smoothing = 1.0}), Error);
  CHECK_THROWS_AS(softmax_cross_entropy<double>(z, std::vector<std::int32_t>{0, 1}, d), Error);
  Matrix<double> big(5, 5);
  CHECK_THROWS_AS(softmax_cross_entropy<double>(big.topRows(4), y, big.bottomRows(4)), Error);
  CHECK((d.array() == 3.0).all());
  // All targets ignored: loss 0, gradient 0.
  const auto none = softmax_cross_entropy<double>(z, std::vector<std::int32_t>(4, -100), d);
  CHECK(none.counted == 0);
  CHECK(none.mean() == 0.0);
  CHECK(d.isZero(0));
}

TEST_CASE("chunked_cross_entropy through a Linear head equals the loss on full logits",
          "[training]") {
  const Index n = 23, d_model = 6, vocab = 40;
  const Matrix<double> hidden = random<double>(n, d_model, 3);
  std::vector<std::int32_t> y(n);
  for (Index t = 0; t < n; ++t)
    y[std::size_t(t)] = t % 5 == 2 ? -1 : std::int32_t((t * 7) % vocab);
  const CrossEntropyConfig base{.ignore_index = -1, .label_smoothing = 0.05};

  // Unchunked: full logits, their gradient, then the head's backward by hand.
  Linear<double> head({.d_in = d_model, .d_out = vocab, .seed = 4});
  randomise(head, 5);
  Matrix<double> logits(n, vocab), d_logits(n, vocab);
  head.forward(hidden, logits, {1, n, {}});
  const auto full = softmax_cross_entropy<double>(logits, y, d_logits, base);
  const MatD w = parameters(head).at("w");
  const MatD d_hidden_expected = d_logits * w.transpose();
  const MatD d_w_expected = hidden.transpose() * d_logits;

  for (const Index chunk : {1, 4, 7, 23, 100}) {
    CAPTURE(chunk);
    CrossEntropyConfig config = base;
    config.chunk = chunk;
    head.zero_grad();
    Matrix<double> d_hidden(n, d_model);
    layer_workspace().reset_peak();
    const auto result = chunked_cross_entropy(hidden, head, y, d_hidden, config);
    CHECK(result.mean() == Approx(full.mean()).epsilon(1e-13));
    CHECK(result.counted == full.counted);
    CHECK(result.correct == full.correct);
    CHECK(reference::relative_error(d_hidden, d_hidden_expected) < 1e-13);
    CHECK(reference::relative_error(gradients(head)[0], d_w_expected) < 1e-13);
    CHECK(reference::relative_error(gradients(head)[1], d_logits.colwise().sum()) < 1e-13);
    // Only a chunk of logits at a time.
    CHECK(layer_workspace().peak_bytes() <=
          Workspace::bytes_for<double>(std::min(chunk, n) * vocab));
    CHECK(chunked_cross_entropy(hidden, head, y, config).mean() ==
          Approx(full.mean()).epsilon(1e-13));
  }
  Matrix<double> d_hidden(n, d_model);
  std::vector<std::int32_t> bad = y;
  bad[9] = vocab;
  CHECK_THROWS_AS(chunked_cross_entropy(hidden, head, bad, d_hidden, base), Error);
}

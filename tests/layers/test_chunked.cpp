// Chunked<L>: equals L, with scratch and activations of one chunk.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;

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

// A Reformer-style encoder as one type: reversible blocks of (pre-norm attention,
// pre-norm chunked feed-forward). Change `Policy` to try another attention.
//
//   reformer_encoder [tokens] [depth]      (defaults: 4096 tokens, 6 blocks)
#include <effattn/effattn.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>

using namespace effattn;

// One alias chooses the attention; the rest of the model does not change.
using Policy = LSHAttention<float>;  // or FullAttention<float>, Favor<float>
using Masking = Causal;              // LowRank<float> needs Bidirectional
using Attention = PreNorm<MultiHeadAttention<Policy, Masking>>;
using FeedForwardPart = PreNorm<Chunked<FeedForward<float>>>;
using Block = Reversible<Attention, FeedForwardPart>;
// Enter the two-half layout, run the blocks, leave it by concatenating the halves.
using Encoder = Sequential<Duplicate<float>, Repeat<Block>, MergeHalves<float>>;

int main(int argc, char** argv) {
  const Index n = argc > 1 ? std::atol(argv[1]) : 4096;
  const Index depth = argc > 2 ? std::atol(argv[2]) : 6;
  const Index d = 256;
  Block::Config block{.f = {.layer = {.d_model = d, .heads = 4}},
                      .g = {.layer = {.layer = {.d_model = d, .d_ff = 4 * d}, .chunk = 256}}};
  Encoder encoder({.d_model = d}, {.block = block, .depth = depth}, {.d_model = d});

  const SequenceShape shape{.batch = 1, .seq = n};
  Matrix<float> x(n, d), y(n, encoder.d_out()), dy(n, encoder.d_out()), dx(n, d);
  CounterRng(1).fill_normal(x);
  CounterRng(2).fill_normal(dy);
  std::size_t parameters = 0;
  encoder.visit_parameters([&](auto, auto& w, auto&) { parameters += std::size_t(w.size()); });

  using Clock = std::chrono::steady_clock;
  auto seconds = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  encoder.set_training(true);
  activation_meter().reset_peak();
  layer_workspace().reset_peak();
  const auto t0 = Clock::now();
  encoder.forward(x, y, shape);
  const auto t1 = Clock::now();
  encoder.backward(x, dy, dx, shape);
  const auto t2 = Clock::now();

  std::printf("%s encoder: %lld tokens, %lld blocks, d_model %lld, %.1f M parameters\n",
              std::string(Policy::name).c_str(), static_cast<long long>(n),
              static_cast<long long>(depth), static_cast<long long>(d), parameters / 1e6);
  std::printf("forward %.3f s, backward %.3f s (recomputes each block's forward)\n",
              seconds(t0, t1), seconds(t1, t2));
  std::printf("peak activations held %.1f MiB, peak layer scratch %.1f MiB, |dx| = %.3f\n",
              activation_meter().peak() / 1048576.0, layer_workspace().peak_bytes() / 1048576.0,
              dx.norm());
  return y.allFinite() && dx.allFinite() ? 0 : 1;
}

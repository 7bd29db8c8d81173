// A language model trained end to end with effattn alone: embedding, positions, two causal
// attention blocks, an output head, chunked cross-entropy, AdamW with clipping and a cosine
// schedule, and a checkpoint. The task is the Reformer paper's duplication task in miniature:
// sequences 0 w 0 w with w random symbols, the loss counted on the second copy only (the
// first is unpredictable). Prints the loss and accuracy as it trains; exits with 1 unless the
// model learns to copy (accuracy on the second copy ≥ 90 %). Usage: training_loop [steps]
#include <effattn/effattn.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace effattn;

// Sequences 0 w 0 w (w: `half` − 1 symbols from 1 … vocab − 1); targets are the next tokens,
// counted on the second copy of w only (−100 elsewhere, as PyTorch's ignore_index).
void make_batch(std::int64_t index, Index batch, Index half, Index vocab,
                std::vector<std::int32_t>& ids, std::vector<std::int32_t>& targets) {
  const Index seq = 2 * half;
  ids.assign(std::size_t(batch * seq), 0);
  targets.assign(ids.size(), -100);
  Matrix<float> u(batch, half);
  CounterRng(7, std::uint64_t(index)).fill_uniform(u, 0.0, 1.0);  // batch `index`, fresh
  for (Index b = 0; b < batch; ++b) {
    for (Index i = 1; i < half; ++i) {
      const auto w = std::int32_t(1 + Index(u(b, i) * float(vocab - 1)) % (vocab - 1));
      ids[std::size_t(b * seq + i)] = ids[std::size_t(b * seq + half + i)] = w;
    }
    for (Index t = half; t + 1 < seq; ++t)  // predicting w's second copy from its first
      targets[std::size_t(b * seq + t)] = ids[std::size_t(b * seq + t + 1)];
  }
}

int main(int argc, char** argv) {
  const std::int64_t steps = argc > 1 ? std::atoll(argv[1]) : 300;
  const Index vocab = 16, half = 12, batch = 16, d = 64;
  const SequenceShape shape{.batch = batch, .seq = 2 * half};

  using Attention = Residual<PreNorm<MultiHeadAttention<FullAttention<float>, Causal>>>;
  using FeedForwardBlock = Residual<PreNorm<FeedForward<float>>>;
  using Model = Sequential<SinusoidalPositions<float>, Attention, FeedForwardBlock, Attention,
                           FeedForwardBlock, LayerNorm<float>>;
  Embedding<float> embed({.vocab = vocab, .d_model = d, .seed = 1});
  Model model({.d_model = d}, {.layer = {.layer = {.d_model = d, .heads = 4, .seed = 2}}},
              {.layer = {.layer = {.d_model = d, .seed = 3}}},
              {.layer = {.layer = {.d_model = d, .heads = 4, .seed = 4}}},
              {.layer = {.layer = {.d_model = d, .seed = 5}}}, {.d_model = d});
  Linear<float> head({.d_in = d, .d_out = vocab, .seed = 6});

  Matrix<float> x(shape.tokens(), d), h(shape.tokens(), d), dh(shape.tokens(), d),
      dx(shape.tokens(), d);
  std::vector<std::int32_t> ids, targets;
  AdamW<float> opt({.lr = 3e-3});
  model.set_training(true);
  double accuracy = 0;
  for (std::int64_t step = 0; step < steps; ++step) {
    make_batch(step, batch, half, vocab, ids, targets);  // targets: next ids, −100 = skip
    embed.forward(ids, x);
    model.forward(x, h, shape);
    CrossEntropy loss = chunked_cross_entropy(h, head, targets, dh);  // also head's gradients
    model.backward(x, dh, dx, shape);
    embed.backward(ids, dx);
    clip_grad_norm(1.0, embed, model, head);
    opt.set_lr(3e-3 * cosine_decay(step, steps / 10, steps));
    opt.step(embed, model, head);
    embed.zero_grad(), model.zero_grad(), head.zero_grad();

    accuracy = loss.accuracy();
    if (step % 50 == 0 || step + 1 == steps)
      std::printf("step %4lld  loss %.3f  accuracy %5.1f %%\n", static_cast<long long>(step),
                  loss.mean(), 100 * accuracy);
  }
  safetensors::save("training_loop.safetensors", embed, model, head);
  std::printf("saved %zu tensors to training_loop.safetensors\n",
              parameter_paths(model).size() + 2);
  return accuracy >= 0.9 ? 0 : 1;
}

// A language model trained end to end with effattn alone: embedding, positions, two causal
// attention blocks, an output head, chunked cross-entropy, AdamW with clipping and a cosine
// schedule, and a checkpoint, which a fresh model then loads to continue sequences greedily,
// token by token, with incremental decoding. The task is the Reformer paper's duplication task
// in miniature: sequences 0 w 0 w with w random symbols, the loss counted on the second copy
// only (the first is unpredictable). Prints the loss and accuracy as it trains, then the
// share of symbols the loaded model copies when it writes the second copy itself; exits with 1
// unless the model learned to copy (≥ 90 % of the second copy, trained and decoded).
// Usage: training_loop [steps]
#include <effattn/effattn.hpp>

#include "copy_task.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace effattn;

using Attention = Residual<PreNorm<MultiHeadAttention<FullAttention<float>, Causal>>>;
using FeedForwardBlock = Residual<PreNorm<FeedForward<float>>>;
using Model = Sequential<SinusoidalPositions<float>, Attention, FeedForwardBlock, Attention,
                         FeedForwardBlock, LayerNorm<float>>;

// Token ids → embedding → model → head → logits.
struct LanguageModel {
  Embedding<float> embed;
  Model model;
  Linear<float> head;
  LanguageModel(Index vocab, Index d)
      : embed({.vocab = vocab, .d_model = d, .seed = 1}),
        model({.d_model = d}, {.layer = {.layer = {.d_model = d, .heads = 4, .seed = 2}}},
              {.layer = {.layer = {.d_model = d, .seed = 3}}},
              {.layer = {.layer = {.d_model = d, .heads = 4, .seed = 4}}},
              {.layer = {.layer = {.d_model = d, .seed = 5}}}, {.d_model = d}),
        head({.d_in = d, .d_out = vocab, .seed = 6}) {}
};

// Feeds each sequence's 0 w 0 to the model and lets it write w's second copy greedily (the
// most likely next symbol, fed back in), one token per step through the decoder's key/value
// caches. Returns the share of symbols copied right.
double copy_by_decoding(LanguageModel& lm, const std::vector<std::int32_t>& ids, Index batch,
                        Index half) {
  const Index seq = 2 * half, d = lm.model.d_in(), vocab = lm.head.d_out();
  auto decoder = lm.model.start_decoding(batch);
  std::vector<std::int32_t> next(std::size_t(batch * (half + 1)));  // the prompt, 0 w 0
  for (Index b = 0; b < batch; ++b)
    for (Index t = 0; t <= half; ++t)
      next[std::size_t(b * (half + 1) + t)] = ids[std::size_t(b * seq + t)];
  Index m = half + 1, right = 0;
  for (Index i = 1; i < half; ++i) {  // writes symbol i of the second copy
    Matrix<float> x(batch * m, d), h(batch * m, d), logits(batch, vocab);
    lm.embed.forward(next, x);
    lm.model.decode(x, h, decoder);
    Matrix<float> last(batch, d);
    for (Index b = 0; b < batch; ++b)
      last.row(b) = h.row(b * m + m - 1);
    lm.head.forward(last, logits, {.batch = batch, .seq = 1});
    next.assign(std::size_t(batch), 0);
    for (Index b = 0; b < batch; ++b) {
      Index best = 0;
      logits.row(b).maxCoeff(&best);
      next[std::size_t(b)] = std::int32_t(best);
      right += best == ids[std::size_t(b * seq + half + i)];
    }
    m = 1;
  }
  return double(right) / double(batch * (half - 1));
}

int main(int argc, char** argv) {
  const std::int64_t steps = argc > 1 ? std::atoll(argv[1]) : 300;
  const Index vocab = 16, half = 12, batch = 16, d = 64;
  const SequenceShape shape{.batch = batch, .seq = 2 * half};
  LanguageModel lm(vocab, d);
  auto& [embed, model, head] = lm;

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

  LanguageModel loaded(vocab, d);  // fresh parameters, then the checkpoint's
  safetensors::load("training_loop.safetensors", loaded.embed, loaded.model, loaded.head);
  make_batch(steps + 1, batch, half, vocab, ids, targets);  // sequences not trained on
  const double copied = copy_by_decoding(loaded, ids, batch, half);
  std::printf("the loaded model, decoding greedily, copies %.1f %% of the symbols\n", 100 * copied);
  return accuracy >= 0.9 && copied >= 0.9 ? 0 : 1;
}

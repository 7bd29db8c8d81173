// Converting a trained Transformer into a Performer: the same architecture with exact attention
// swapped for FAVOR+ has no new parameters, so the exact model's checkpoint loads into it (the
// Performer paper's "backward compatibility", its LM1B figure). The task is training_loop's
// copy task (sequences 0 w 0 w, the loss on the second copy). Exact attention is trained and
// saved; a Favor model loads the checkpoint non-strictly (its random features are its own: the
// file has none), is evaluated right away, fine-tuned and evaluated again; a Favor model trained
// from scratch for the same steps is the comparison. Prints the table and exits with 1 unless
// fine-tuning the converted model helped and beat training from scratch.
// Usage: convert_to_performer [--quick]
#include <effattn/effattn.hpp>

#include "copy_task.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace effattn;

constexpr Index kVocab = 16, kHalf = 12, kBatch = 16, kWidth = 64;

// The language model of training_loop with any causal attention policy: the parameters (and
// their paths) do not depend on the policy.
template <class Policy>
struct LanguageModel {
  using Attention = Residual<PreNorm<MultiHeadAttention<Policy, Causal>>>;
  using FeedForwardBlock = Residual<PreNorm<FeedForward<float>>>;
  using Model = Sequential<SinusoidalPositions<float>, Attention, FeedForwardBlock, Attention,
                           FeedForwardBlock, LayerNorm<float>>;
  Embedding<float> embed{{.vocab = kVocab, .d_model = kWidth, .seed = 1}};
  Model model{{.d_model = kWidth},
              {.layer = {.layer = {.d_model = kWidth, .heads = 4, .seed = 2}}},
              {.layer = {.layer = {.d_model = kWidth, .seed = 3}}},
              {.layer = {.layer = {.d_model = kWidth, .heads = 4, .seed = 4}}},
              {.layer = {.layer = {.d_model = kWidth, .seed = 5}}},
              {.d_model = kWidth}};
  Linear<float> head{{.d_in = kWidth, .d_out = kVocab, .seed = 6}};
};

const SequenceShape kShape{.batch = kBatch, .seq = 2 * kHalf};

// `steps` steps of AdamW (3e-3, warm-up then cosine decay) on batches first, first + 1, …
template <class LM>
void train(LM& lm, std::int64_t steps, std::int64_t first) {
  Matrix<float> x(kShape.tokens(), kWidth), h(kShape.tokens(), kWidth), dh(kShape.tokens(), kWidth),
      dx(kShape.tokens(), kWidth);
  std::vector<std::int32_t> ids, targets;
  AdamW<float> opt({.lr = 3e-3});
  lm.model.set_training(true);
  for (std::int64_t step = 0; step < steps; ++step) {
    make_batch(first + step, kBatch, kHalf, kVocab, ids, targets);
    lm.embed.forward(ids, x);
    lm.model.forward(x, h, kShape);
    chunked_cross_entropy(h, lm.head, targets, dh);
    lm.model.backward(x, dh, dx, kShape);
    lm.embed.backward(ids, dx);
    clip_grad_norm(1.0, lm.embed, lm.model, lm.head);
    opt.set_lr(3e-3 * cosine_decay(step, steps / 10, steps));
    opt.step(lm.embed, lm.model, lm.head);
    lm.embed.zero_grad(), lm.model.zero_grad(), lm.head.zero_grad();
  }
  lm.model.set_training(false);
}

struct Score {
  double loss = 0, accuracy = 0;
};

// Loss and accuracy on 8 batches never trained on.
template <class LM>
Score evaluate(LM& lm) {
  Matrix<float> x(kShape.tokens(), kWidth), h(kShape.tokens(), kWidth), dh(kShape.tokens(), kWidth);
  std::vector<std::int32_t> ids, targets;
  Score s;
  constexpr int batches = 8;
  for (int i = 0; i < batches; ++i) {
    make_batch(1'000'000 + i, kBatch, kHalf, kVocab, ids, targets);
    lm.embed.forward(ids, x);
    lm.model.forward(x, h, kShape);
    const CrossEntropy loss = chunked_cross_entropy(h, lm.head, targets, dh);
    s.loss += loss.mean() / batches;
    s.accuracy += loss.accuracy() / batches;
  }
  lm.head.zero_grad();  // evaluation's cross-entropy also made the head's gradients
  return s;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const std::int64_t source_steps = quick ? 200 : 400, tune_steps = quick ? 60 : 400;
  const char* file = "convert_source.safetensors";

  LanguageModel<FullAttention<float>> exact;
  train(exact, source_steps, 0);
  const Score source = evaluate(exact);
  safetensors::save(file, exact.embed, exact.model, exact.head);

  // Favor has no parameters of its own, only random features, which the file cannot have:
  // a strict load refuses it; a non-strict one keeps the Favor model's own draws.
  LanguageModel<Favor<float>> converted;
  const auto report =
      safetensors::load(file, {.strict = false}, converted.embed, converted.model, converted.head);
  std::printf("%s\n\n", report.summary().c_str());
  const Score loaded = evaluate(converted);
  train(converted, tune_steps, source_steps);
  const Score tuned = evaluate(converted);

  LanguageModel<Favor<float>> scratch;
  train(scratch, tune_steps, source_steps);
  const Score fresh = evaluate(scratch);

  std::printf("| model | training steps | loss | accuracy |\n|---|---|---|---|\n");
  const auto row = [](const char* name, std::int64_t steps, const Score& s) {
    std::printf("| %s | %lld | %.4f | %.1f %% |\n", name, static_cast<long long>(steps), s.loss,
                100 * s.accuracy);
  };
  row("exact attention (the source)", source_steps, source);
  row("Favor, the source's parameters loaded", 0, loaded);
  row("Favor, loaded, then fine-tuned", tune_steps, tuned);
  row("Favor from scratch", tune_steps, fresh);
  std::remove(file);
  return tuned.loss < loaded.loss && tuned.loss < fresh.loss ? 0 : 1;
}

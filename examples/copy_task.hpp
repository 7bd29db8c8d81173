#pragma once
// The copy task of training_loop, convert_to_performer and evaluate_and_decode: the Reformer
// paper's duplication task in miniature (sequences 0 w 0 w, w random symbols, the loss counted
// on the second copy only), the language model the three examples share, and its training,
// evaluation and greedy decoding.

#include <effattn/effattn.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace copy_task {

using effattn::Index;

constexpr Index kVocab = 16, kHalf = 12, kBatch = 16, kWidth = 64;
inline const effattn::SequenceShape kShape{.batch = kBatch, .seq = 2 * kHalf};

// Sequences 0 w 0 w (w: `half` − 1 symbols from 1 … vocab − 1) of batch `index` (every index a
// fresh batch); targets are the next tokens, counted on the second copy of w only (−100
// elsewhere, as PyTorch's ignore_index).
inline void make_batch(std::int64_t index, Index batch, Index half, Index vocab,
                       std::vector<std::int32_t>& ids, std::vector<std::int32_t>& targets) {
  const Index seq = 2 * half;
  ids.assign(std::size_t(batch * seq), 0);
  targets.assign(ids.size(), -100);
  effattn::Matrix<float> u(batch, half);
  effattn::CounterRng(7, std::uint64_t(index)).fill_uniform(u, 0.0, 1.0);
  for (Index b = 0; b < batch; ++b) {
    for (Index i = 1; i < half; ++i) {
      const auto w = std::int32_t(1 + Index(u(b, i) * float(vocab - 1)) % (vocab - 1));
      ids[std::size_t(b * seq + i)] = ids[std::size_t(b * seq + half + i)] = w;
    }
    for (Index t = half; t + 1 < seq; ++t)  // predicting w's second copy from its first
      targets[std::size_t(b * seq + t)] = ids[std::size_t(b * seq + t + 1)];
  }
}

// Token ids → embedding → positions, two causal attention blocks with feed-forward blocks, a
// final norm → head → logits. The parameters (and their paths) do not depend on the policy,
// so a checkpoint of one policy's model loads into another's.
template <class Policy>
struct LanguageModel {
  using Attention =
      effattn::Residual<effattn::PreNorm<effattn::MultiHeadAttention<Policy, effattn::Causal>>>;
  using FeedForwardBlock = effattn::Residual<effattn::PreNorm<effattn::FeedForward<float>>>;
  using Model =
      effattn::Sequential<effattn::SinusoidalPositions<float>, Attention, FeedForwardBlock,
                          Attention, FeedForwardBlock, effattn::LayerNorm<float>>;
  effattn::Embedding<float> embed{{.vocab = kVocab, .d_model = kWidth, .seed = 1}};
  Model model{{.d_model = kWidth},
              {.layer = {.layer = {.d_model = kWidth, .heads = 4, .seed = 2}}},
              {.layer = {.layer = {.d_model = kWidth, .seed = 3}}},
              {.layer = {.layer = {.d_model = kWidth, .heads = 4, .seed = 4}}},
              {.layer = {.layer = {.d_model = kWidth, .seed = 5}}},
              {.d_model = kWidth}};
  effattn::Linear<float> head{{.d_in = kWidth, .d_out = kVocab, .seed = 6}};
};

// `steps` steps of AdamW (3e-3, warm-up then cosine decay, gradients clipped to norm 1) on
// batches first, first + 1, …; after each, on_step(step, loss) if given.
template <class LM, class OnStep>
void train(LM& lm, std::int64_t steps, std::int64_t first, OnStep&& on_step) {
  using effattn::Matrix;
  Matrix<float> x(kShape.tokens(), kWidth), h(kShape.tokens(), kWidth), dh(kShape.tokens(), kWidth),
      dx(kShape.tokens(), kWidth);
  std::vector<std::int32_t> ids, targets;  // targets: the next ids, −100 where not counted
  effattn::AdamW<float> opt({.lr = 3e-3});
  lm.model.set_training(true);
  for (std::int64_t step = 0; step < steps; ++step) {
    make_batch(first + step, kBatch, kHalf, kVocab, ids, targets);
    lm.embed.forward(ids, x);
    lm.model.forward(x, h, kShape);
    // The loss, and the head's gradients and dh (never all tokens × vocabulary logits at once).
    const effattn::CrossEntropy loss = effattn::chunked_cross_entropy(h, lm.head, targets, dh);
    lm.model.backward(x, dh, dx, kShape);
    lm.embed.backward(ids, dx);
    effattn::clip_grad_norm(1.0, lm.embed, lm.model, lm.head);
    opt.set_lr(3e-3 * effattn::cosine_decay(step, steps / 10, steps));
    opt.step(lm.embed, lm.model, lm.head);
    lm.embed.zero_grad(), lm.model.zero_grad(), lm.head.zero_grad();
    on_step(step, loss);
  }
  lm.model.set_training(false);
}
template <class LM>
void train(LM& lm, std::int64_t steps, std::int64_t first) {
  train(lm, steps, first, [](std::int64_t, const effattn::CrossEntropy&) {});
}

struct Score {
  double loss = 0, accuracy = 0;
};

// Loss and accuracy on 8 batches never trained on (batches 1 000 000 …), in inference mode.
template <class LM>
Score evaluate(LM& lm) {
  using effattn::Matrix;
  Matrix<float> x(kShape.tokens(), kWidth), h(kShape.tokens(), kWidth), dh(kShape.tokens(), kWidth);
  std::vector<std::int32_t> ids, targets;
  Score s;
  constexpr int batches = 8;
  lm.model.set_training(false);
  for (int i = 0; i < batches; ++i) {
    make_batch(1'000'000 + i, kBatch, kHalf, kVocab, ids, targets);
    lm.embed.forward(ids, x);
    lm.model.forward(x, h, kShape);
    const effattn::CrossEntropy loss = effattn::chunked_cross_entropy(h, lm.head, targets, dh);
    s.loss += loss.mean() / batches;
    s.accuracy += loss.accuracy() / batches;
  }
  lm.head.zero_grad();  // evaluation's cross-entropy also made the head's gradients
  return s;
}

// Feeds each sequence's 0 w 0 (`ids`: `batch` sequences 0 w 0 w) to the model and lets it write
// w's second copy greedily (the most likely next symbol, fed back in), one token per step
// through the decoders (key/value caches for exact attention, running sums for Favor). Writes
// the symbols it wrote to `written` (batch × (half − 1)) and returns the share written right.
template <class LM>
double copy_by_decoding(LM& lm, const std::vector<std::int32_t>& ids, Index batch,
                        std::vector<std::int32_t>& written) {
  using effattn::Matrix;
  const Index seq = 2 * kHalf, d = lm.model.d_in(), vocab = lm.head.d_out();
  lm.model.set_training(false);
  auto decoder = lm.model.start_decoding(batch);
  std::vector<std::int32_t> next(std::size_t(batch * (kHalf + 1)));  // the prompt, 0 w 0
  for (Index b = 0; b < batch; ++b)
    for (Index t = 0; t <= kHalf; ++t)
      next[std::size_t(b * (kHalf + 1) + t)] = ids[std::size_t(b * seq + t)];
  written.assign(std::size_t(batch * (kHalf - 1)), 0);
  Index m = kHalf + 1, right = 0;
  for (Index i = 1; i < kHalf; ++i) {  // writes symbol i of the second copy
    Matrix<float> x(batch * m, d), h(batch * m, d), logits(batch, vocab), last(batch, d);
    lm.embed.forward(next, x);
    lm.model.decode(x, h, decoder);
    for (Index b = 0; b < batch; ++b)
      last.row(b) = h.row(b * m + m - 1);
    lm.head.forward(last, logits, {.batch = batch, .seq = 1});
    next.assign(std::size_t(batch), 0);
    for (Index b = 0; b < batch; ++b) {
      Index best = 0;
      logits.row(b).maxCoeff(&best);
      next[std::size_t(b)] = std::int32_t(best);
      written[std::size_t(b * (kHalf - 1) + i - 1)] = std::int32_t(best);
      right += best == ids[std::size_t(b * seq + kHalf + i)];
    }
    m = 1;
  }
  return double(right) / double(batch * (kHalf - 1));
}

}  // namespace copy_task

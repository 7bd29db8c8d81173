// A language model trained end to end with effattn alone: embedding, positions, two causal
// attention blocks, an output head, chunked cross-entropy, AdamW with clipping and a cosine
// schedule, and a checkpoint, which a fresh model then loads to continue sequences greedily,
// token by token, with incremental decoding. The task is the Reformer paper's duplication task
// in miniature: sequences 0 w 0 w with w random symbols, the loss counted on the second copy
// only (the first is unpredictable). Prints the loss and accuracy as it trains, then the
// share of symbols the loaded model copies when it writes the second copy itself. Exits with 1
// unless the loss fell, the loaded model writes exactly what the trained one writes, and, from
// 300 steps on, the model learned to copy (≥ 90 % of the second copy, trained and decoded).
// Usage: training_loop [steps]
#include <effattn/effattn.hpp>

#include "copy_task.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace effattn;

using copy_task::kBatch, copy_task::kHalf, copy_task::kVocab, copy_task::kWidth;

// Token ids → embedding → positions, two causal blocks, a final norm → head → logits
// (copy_task.hpp).
using LanguageModel = copy_task::LanguageModel<FullAttention<float>>;

int main(int argc, char** argv) {
  const std::int64_t steps = argc > 1 ? std::atoll(argv[1]) : 300;
  const Index vocab = kVocab, half = kHalf, batch = kBatch;
  LanguageModel lm;
  auto& [embed, model, head] = lm;

  // The loop itself is copy_task::train (copy_task.hpp): a batch, forward, chunked cross-entropy,
  // backward, clipping, the schedule, an AdamW step, zeroed gradients.
  double accuracy = 0, first_loss = 0, last_loss = 0;
  copy_task::train(lm, steps, 0, [&](std::int64_t step, const CrossEntropy& loss) {
    accuracy = loss.accuracy();
    (step == 0 ? first_loss : last_loss) = loss.mean();
    if (step % 50 == 0 || step + 1 == steps)
      std::printf("step %4lld  loss %.3f  accuracy %5.1f %%\n", static_cast<long long>(step),
                  loss.mean(), 100 * accuracy);
  });
  safetensors::save("training_loop.safetensors", embed, model, head);
  std::printf("saved %zu tensors to training_loop.safetensors\n",
              parameter_paths(model).size() + 2);

  LanguageModel loaded;  // fresh parameters, then the checkpoint's
  safetensors::load("training_loop.safetensors", loaded.embed, loaded.model, loaded.head);
  std::vector<std::int32_t> ids, targets;
  copy_task::make_batch(steps + 1, batch, half, vocab, ids, targets);  // sequences not trained on
  std::vector<std::int32_t> written, written_before_saving;
  const double copied = copy_task::copy_by_decoding(loaded, ids, batch, written);
  std::printf("the loaded model, decoding greedily, copies %.1f %% of the symbols\n", 100 * copied);
  copy_task::copy_by_decoding(lm, ids, batch, written_before_saving);
  const bool same = written == written_before_saving,
             learned = steps < 300 || (accuracy >= 0.9 && copied >= 0.9);
  if (!same) std::printf("the loaded model writes otherwise than the model that was saved\n");
  return last_loss < first_loss && same && learned ? 0 : 1;
}

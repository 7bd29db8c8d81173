// Converting a trained Transformer into a Performer: the same architecture with exact attention
// swapped for FAVOR+ has no new parameters, so the exact model's checkpoint loads into it (the
// Performer paper's "backward compatibility", its LM1B figure). The task is training_loop's
// copy task (sequences 0 w 0 w, the loss on the second copy). Exact attention is trained and
// saved; a Favor model loads the checkpoint non-strictly (its random features are its own: the
// file has none), is evaluated right away, fine-tuned and evaluated again; a Favor model trained
// from scratch for the same steps is the comparison. Prints the table and exits with 1 unless
// fine-tuning the converted model helped and beat training from scratch.
// --quick trains the source 200 steps and fine-tunes 60; --smoke (for the sanitizers) 30 and 15,
// and checks only that fine-tuning the converted model helped.
// Usage: convert_to_performer [--quick | --smoke]
#include <effattn/effattn.hpp>

#include "copy_task.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace effattn;

using copy_task::evaluate, copy_task::LanguageModel, copy_task::Score, copy_task::train;

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const bool smoke = argc > 1 && std::strcmp(argv[1], "--smoke") == 0;
  const std::int64_t source_steps = smoke   ? 30
                                    : quick ? 200
                                            : 400,
                     tune_steps = smoke   ? 15
                                  : quick ? 60
                                          : 400;
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
  return tuned.loss < loaded.loss && (smoke || tuned.loss < fresh.loss) ? 0 : 1;
}

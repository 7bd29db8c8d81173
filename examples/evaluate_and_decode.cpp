// Using a trained checkpoint: load it into a model, evaluate it, and let it write. The file is
// one that training_loop writes (training_loop.safetensors: the copy task's model with exact
// attention). The model is built with exact attention, or with FAVOR+ (--favor): then the
// exact model's file lacks Favor's random features, so it is loaded non-strictly and the
// report says what was left out (the features keep their own draw; a file written from a
// Favor model holds them and loads strictly); anything else left out is a failure. The program
// prints the report, the loss and accuracy on 8 held-out batches, then four held-out prompts 0 w 0
// and the copy of w the model writes greedily, one token at a time through its decoders (exact
// attention: key/value caches; Favor: running sums, whose size does not grow with the text). Exits
// with 1 unless the file loads and the model copies at least the share of symbols --expect-copy
// asks for (default 0). Usage: evaluate_and_decode <checkpoint> [--favor] [--expect-copy SHARE]
#include <effattn/effattn.hpp>

#include "copy_task.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace effattn;

template <class Policy>
int run(const char* file, bool strict, double expect_copy) {
  copy_task::LanguageModel<Policy> lm;
  try {
    const auto report = safetensors::load(file, {.strict = strict}, lm.embed, lm.model, lm.head);
    std::printf("%s\n", report.summary().c_str());
    // Loaded non-strictly, the model may lack only what the file cannot have: random features.
    for (const std::string& tensor : report.missing)
      if (!tensor.ends_with(".features")) return 1;
    if (!report.unexpected.empty() || !report.mismatched.empty()) return 1;
  } catch (const Error& e) {  // a missing file, another model's file, a damaged one
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }

  const copy_task::Score score = copy_task::evaluate(lm);
  std::printf("held-out loss %.4f, accuracy %.1f %% (the second copy's symbols)\n\n", score.loss,
              100 * score.accuracy);

  const Index batch = 4, half = copy_task::kHalf, seq = 2 * half;
  std::vector<std::int32_t> ids, targets, written;
  copy_task::make_batch(2'000'000, batch, half, copy_task::kVocab, ids, targets);
  const double copied = copy_task::copy_by_decoding(lm, ids, batch, written);
  for (Index b = 0; b < batch; ++b) {
    std::string line = "prompt";
    for (Index t = 0; t <= half; ++t)
      line += " " + std::to_string(ids[std::size_t(b * seq + t)]);
    line += "  → wrote";
    for (Index i = 1; i < half; ++i) {
      const std::int32_t w = written[std::size_t(b * (half - 1) + i - 1)];
      line += " " + std::to_string(w) + (w == ids[std::size_t(b * seq + half + i)] ? "" : "*");
    }
    std::printf("%s\n", line.c_str());
  }
  std::printf("\ncopied %.1f %% of the symbols (* marks a wrong one)\n", 100 * copied);
  return copied >= expect_copy ? 0 : 1;
}

int main(int argc, char** argv) {
  bool favor = false, ok = argc >= 2;
  double expect_copy = 0;
  for (int i = 2; ok && i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--favor")
      favor = true;
    else if (arg == "--expect-copy" && i + 1 < argc)
      expect_copy = std::atof(argv[++i]);
    else
      ok = false;
  }
  if (!ok) {
    std::fprintf(stderr,
                 "usage: evaluate_and_decode <checkpoint> [--favor] [--expect-copy SHARE]\n");
    return 2;
  }
  if (favor) return run<Favor<float>>(argv[1], /*strict=*/false, expect_copy);
  return run<FullAttention<float>>(argv[1], /*strict=*/true, expect_copy);
}

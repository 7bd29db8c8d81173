// A downstream program that uses the optional parts: a checkpoint saved and loaded
// (effattn::checkpoints) and the sequence-parallel headers compiled against MPI (effattn::mpi).
#include <effattn/effattn.hpp>
#include <effattn/mpi/sequence_parallel.hpp>
#include <effattn/training/safetensors.hpp>

#include <cstdio>
#include <filesystem>

int main() {
  using namespace effattn;
  static_assert(sizeof(mpi::SequenceParallel<FullAttention<float>>) > 0);
  Linear<float> saved({.d_in = 4, .d_out = 3, .seed = 1}), loaded({.d_in = 4, .d_out = 3});
  const auto file = std::filesystem::temp_directory_path() / "effattn_consumer.safetensors";
  safetensors::save(file, saved);
  const auto report = safetensors::load(file, loaded);
  std::filesystem::remove(file);
  if (!report.complete() || loaded.weight() != saved.weight()) {
    std::puts("consumer: the checkpoint did not round-trip");
    return 1;
  }
  std::puts("consumer: ok");
  return 0;
}

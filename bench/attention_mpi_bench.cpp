// Google Benchmark under MPI: sequence-parallel attention (mpi::SequenceParallel) on P ranks,
//   mpirun -np P bench/attention_mpi_bench [--benchmark_filter=…]
// Weak scaling: every rank holds n_local positions of each sequence, the whole sequence has
// P · n_local. Names: mpi/<policy>/<forward|train>/n_local:<n>/ranks:<P>/causal:<0|1>.
// Time per iteration is the slowest rank's (a barrier, the call, the maximum over ranks), and
// every benchmark runs a fixed number of iterations so that all ranks make the same calls.
// Counters (the largest over ranks): GFLOPs_per_rank (the policy's work on the whole sequence
// over P, per second, LSH's its own count of this rank's work; training counted as in
// attention_bench), peak_fraction (of one rank's
// measured fp32 FMA peak on its threads), bytes_sent_per_call (what a rank hands to MPI per
// call), scratch_bytes and saved_bytes per rank; tokens_per_s counts whole-sequence tokens.
// Full causal runs on SequenceShards::balanced, the rest on contiguous shards. Only rank 0
// prints.
#include <mpi.h>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <type_traits>
#include <vector>

#include <effattn/mpi/sequence_parallel.hpp>

#include "bench_common.hpp"

using namespace effattn;
using namespace effattn::bench;

namespace {

double peak_gflops = 0;  // one rank's, on its threads

double slowest(double mine) {
  double all = mine;
  MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return all;
}

template <class Policy, class Masking>
void run(benchmark::State& state, Index n_local, bool training) {
  const mpi::Communicator comm;
  const int ranks = comm.size();
  const Problem whole{n_local * ranks, 8, 64, 1, Masking::causal};
  const Problem mine{n_local, 8, 64, 1, Masking::causal};
  const bool balanced = std::is_same_v<Policy, FullAttention<float>> && Masking::causal;
  const auto shards = balanced ? mpi::SequenceShards::balanced(ranks, whole.n)
                               : mpi::SequenceShards::contiguous(comm, n_local);
  using Sharded = mpi::SequenceParallel<Policy>;
  typename detail::CoreOf<Sharded, Masking>::type core(
      {.policy = bench_config<Policy>(whole), .shards = shards},
      HeadLayout{whole.heads, whole.d, whole.d, 1});
  Inputs in(mine, 1 + std::uint64_t(comm.rank()));
  Matrix<float> d_out = in.v, dq(in.q.rows(), in.q.cols()), dk = dq, dv = dq;
  const SequenceShape shape = mine.shape();
  const Matrix<float>& keys = detail::policy_shares_qk<Policy> ? in.q : in.k;
  auto call = [&] {
    core.forward(in.q, keys, in.v, in.out, shape, shape, training);
    if (training) core.backward(in.q, keys, in.v, in.out, d_out, dq, dk, dv, shape, shape);
  };
  call();  // sizes the buffers
  constexpr bool counts_work = requires {
    core.policy().work();
  };
  if constexpr (counts_work) core.policy().reset_work();
  const std::size_t sent_before = core.bytes_sent();
  for (auto _ : state) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = std::chrono::steady_clock::now();
    call();
    state.SetIterationTime(
        slowest(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()));
  }
  const double calls = double(state.iterations());
  const bool exact = std::is_same_v<Policy, FullAttention<float>>;
  // LSHAttention counts its work (it depends on the buckets): this rank's share, forward.
  double forward_work = policy_flops<Policy>(whole) / ranks * calls;
  if constexpr (counts_work) forward_work = slowest(core.policy().work().flops(whole.d, whole.d));
  const double work = (training ? (exact ? 3.5 : 3.0) : 1.0) * forward_work;
  state.counters["GFLOPs_per_rank"] = benchmark::Counter(work / 1e9, benchmark::Counter::kIsRate);
  state.counters["peak_fraction"] =
      benchmark::Counter(work / 1e9 / peak_gflops, benchmark::Counter::kIsRate);
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(whole.tokens()) * calls, benchmark::Counter::kIsRate);
  state.counters["bytes_sent_per_call"] = slowest(double(core.bytes_sent() - sent_before) / calls);
  state.counters["scratch_bytes"] = slowest(double(core.scratch_peak_bytes()));
  state.counters["saved_bytes"] = slowest(double(core.saved_bytes()));
  state.counters["ranks"] = ranks;
}

template <class Policy, class Masking>
void add(const char* policy, Index n_local, bool training, int iterations) {
  int ranks = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const std::string name = std::string("mpi/") + policy + (training ? "/train" : "/forward") +
                           "/n_local:" + std::to_string(n_local) +
                           "/ranks:" + std::to_string(ranks) +
                           "/causal:" + (Masking::causal ? "1" : "0");
  benchmark::RegisterBenchmark(name.c_str(), run<Policy, Masking>, n_local, training)
      ->Iterations(iterations)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

template <class Policy, bool causal>
void add_all(const char* policy, std::vector<Index> sizes) {
  for (const Index n : sizes)
    for (const bool training : {false, true}) {
      const int iterations = n >= 32768 ? 3 : 5;
      add<Policy, Bidirectional>(policy, n, training, iterations);
      if constexpr (causal) add<Policy, Causal>(policy, n, training, iterations);
    }
}

// Prints nothing (ranks other than 0).
class Silent : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const int threads = max_threads();
  peak_gflops = fma_peak_gflops(threads);
  benchmark::AddCustomContext("effattn.machine", machine_description(threads));
  benchmark::AddCustomContext("effattn.fma_peak_gflops_per_rank", std::to_string(peak_gflops));
  benchmark::AddCustomContext("effattn.ranks", std::to_string(ranks));
  add_all<FullAttention<float>, true>("full", {1024, 4096});
  add_all<Favor<float>, true>("favor", {16384, 65536});
  add_all<LowRank<float>, false>("lowrank", {16384, 65536});
  add_all<LSHAttention<float>, true>("lsh", {4096, 16384});
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
    MPI_Finalize();
    return 1;
  }
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    Silent silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}

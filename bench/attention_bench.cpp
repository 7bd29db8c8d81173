// Google Benchmark: every attention policy against the naive materialising reference,
// in one binary and one run. Names: attention/<policy>/n:<n>/h:<h>/d:<d>/causal:<0|1>
// (forward) and attention_train/<policy>/… (forward + backward).
// machine/fma_peak/threads:<t> measures the machine's fp32 FMA peak (one thread and all), and
// every attention benchmark reports peak_fraction: its GFLOPs over the all-thread peak.
// Counters: GFLOPs (the policy's own work per second; LSH: the work its buckets gave),
// tokens_per_s, scratch_bytes (peak workspace of all threads), saved_bytes (what forward keeps for
// backward).
#include <benchmark/benchmark.h>

#include <string>
#include <type_traits>

#include "bench_common.hpp"

using namespace effattn;
using namespace effattn::bench;

namespace {

// The all-thread FMA peak, measured once before the attention benchmarks.
double peak_gflops = 0;

void machine_peak(benchmark::State& state, int threads) {
  double gflops = 0;
  for (auto _ : state)
    gflops = fma_peak_gflops(threads);
  state.counters["GFLOPs"] = gflops;
}

std::string bench_name(const char* kind, const char* policy, const Problem& p) {
  return std::string(kind) + "/" + policy + "/n:" + std::to_string(p.n) +
         "/h:" + std::to_string(p.heads) + "/d:" + std::to_string(p.d) +
         "/causal:" + (p.causal ? "1" : "0");
}

template <class Policy, class Masking>
void forward(benchmark::State& state, Problem p) {
  Inputs in(p);
  Runner<Policy, Masking> run(p);
  run.forward(in, p);  // sizes the workspaces
  run.core.reset_peak();
  run.reset_work();
  for (auto _ : state) {
    run.forward(in, p);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  const double iterations = double(state.iterations());
  state.counters["GFLOPs"] =
      benchmark::Counter(run.flops(p, iterations) / 1e9, benchmark::Counter::kIsRate);
  state.counters["peak_fraction"] =
      benchmark::Counter(run.flops(p, iterations) / 1e9 / peak_gflops, benchmark::Counter::kIsRate);
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(p.tokens()) * iterations, benchmark::Counter::kIsRate);
  state.counters["scratch_bytes"] = double(run.core.scratch_peak_bytes());
  state.SetComplexityN(p.n);
}

template <class Policy, class Masking>
void train(benchmark::State& state, Problem p) {
  Inputs in(p);
  Matrix<float> d_out = in.v, dq(in.q.rows(), in.q.cols()), dk = dq, dv = dq;
  Runner<Policy, Masking> run(p);
  run.forward(in, p, true);
  run.core.reset_peak();
  run.reset_work();
  for (auto _ : state) {
    run.forward(in, p, true);
    run.core.backward(in.q, run.keys(in), in.v, in.out, d_out, dq, dk, dv, p.shape(), p.shape());
    benchmark::DoNotOptimize(dq.data());
    benchmark::ClobberMemory();
  }
  // Exact: forward 4·n²·d, backward 10·n²·d (scores again, dV, dP, dQ, dK) per head.
  // Favor, LowRank and LSH: counted as three forwards.
  const bool exact =
      std::is_same_v<Policy, FullAttention<float>> || std::is_same_v<Policy, NaiveAttention<float>>;
  const double calls = double(state.iterations());
  const double work = exact ? 3.5 * exact_flops(p) * calls : 3.0 * run.flops(p, calls);
  state.counters["GFLOPs"] = benchmark::Counter(work / 1e9, benchmark::Counter::kIsRate);
  state.counters["peak_fraction"] =
      benchmark::Counter(work / 1e9 / peak_gflops, benchmark::Counter::kIsRate);
  state.counters["scratch_bytes"] = double(run.core.scratch_peak_bytes());
  state.counters["saved_bytes"] = double(run.core.saved_bytes());
  state.SetComplexityN(p.n);
}

// Registers attention/<policy>/… (forward) or attention_train/<policy>/… for one problem.
template <class Policy>
void add(const char* policy, const Problem& p, bool training) {
  using Fn = void (*)(benchmark::State&, Problem);
  Fn fn = training ? &train<Policy, Bidirectional> : &forward<Policy, Bidirectional>;
  if constexpr (Policy::supports_causal)
    if (p.causal) fn = training ? &train<Policy, Causal> : &forward<Policy, Causal>;
  const std::string name = bench_name(training ? "attention_train" : "attention", policy, p);
  benchmark::RegisterBenchmark(name.c_str(), fn, p)->UseRealTime()->Unit(benchmark::kMillisecond);
}

template <template <class> class Policy>
void register_policy(const char* name, Index max_n, Index max_train_n) {
  for (const bool causal : {false, true})
    for (Index n = 256; n <= max_n; n *= 2) {
      if (causal && !Policy<float>::supports_causal) continue;
      const Problem p{n, 8, 64, 1, causal};
      add<Policy<float>>(name, p, false);
      if (n <= max_train_n) add<Policy<float>>(name, p, true);
    }
}

template <class S>
using LowRankMeanPooling = LowRank<S, MeanPooling>;

}  // namespace

int main(int argc, char** argv) {
  const int threads = max_threads();
  peak_gflops = fma_peak_gflops(threads);
  benchmark::AddCustomContext("effattn.machine", machine_description(threads));
  benchmark::AddCustomContext("effattn.fma_peak_gflops", std::to_string(peak_gflops));
  for (const int t : {1, threads}) {
    benchmark::RegisterBenchmark(("machine/fma_peak/threads:" + std::to_string(t)).c_str(),
                                 machine_peak, t)
        ->Iterations(1)
        ->Unit(benchmark::kMillisecond);
    if (threads == 1) break;
  }
  register_policy<NaiveAttention>("naive", 8192, 4096);
  register_policy<FullAttention>("full", 16384, 8192);
  register_policy<Favor>("favor", 1 << 20, 65536);
  register_policy<LowRank>("lowrank", 1 << 18, 65536);
  register_policy<LowRankMeanPooling>("lowrank_meanpool", 1 << 20, 65536);
  register_policy<LSHAttention>("lsh", 1 << 20, 65536);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

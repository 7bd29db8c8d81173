// Google Benchmark: every attention policy against the naive materialising reference,
// in one binary and one run. Names: attention/<policy>/n:<n>/h:<h>/d:<d>/causal:<0|1>
// (forward) and attention_train/<policy>/… (forward + backward).
// machine/fma_peak/threads:<t> measures the machine's fp32 FMA peak (one thread and all), and
// every attention benchmark reports peak_fraction: its GFLOPs over the all-thread peak.
// attention/full_window512/… is exact attention in a window of 512 keys (causal: the 512 up to
// the row; not: 256 before and 255 after), its GFLOPs counted on the pairs it lets through.
// attention/full_alibi/… and full_softcap/… are exact attention with ALiBi's biases or a soft
// cap of 30, to compare with attention/full/… at the same n.
// h:1 benchmarks (one sequence, one head) show whether the threads share a head's work;
// decode/<policy>/ctx:<c>/h:1/d:64 times one new token against a c-token cache or state;
// decode/full/ctx:16384/h:8/kv:<g>/d:64 with 8 query heads over g key/value heads (GQA; g = 8:
// every head its own, g = 1: MQA), cache_bytes its cache.
// Counters: GFLOPs (the policy's own work per second; LSH: the work its buckets gave),
// tokens_per_s, scratch_bytes (peak workspace of all threads), saved_bytes (what forward keeps for
// backward), tasks (what the call's largest stage handed to the threads: problems × blocks).
#include <benchmark/benchmark.h>

#include <string>
#include <type_traits>
#include <utility>

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
void forward_with(benchmark::State& state, Problem p, typename Policy::Config config) {
  Inputs in(p);
  Runner<Policy, Masking> run(p, std::move(config));
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
  state.counters["tasks"] = double(run.core.last_tasks());
  state.SetComplexityN(p.n);
}

template <class Policy, class Masking>
void forward(benchmark::State& state, Problem p) {
  forward_with<Policy, Masking>(state, p, bench_config<Policy>(p));
}

template <class Policy, class Masking>
void train_with(benchmark::State& state, Problem p, typename Policy::Config config) {
  Inputs in(p);
  Matrix<float> d_out = in.v, dq(in.q.rows(), in.q.cols()), dk = dq, dv = dq;
  Runner<Policy, Masking> run(p, std::move(config));
  run.forward(in, p, true);
  run.core.reset_peak();
  run.reset_work();
  Index tasks = 0;
  for (auto _ : state) {
    run.forward(in, p, true);
    tasks = run.core.last_tasks();
    run.core.backward(in.q, run.keys(in), in.v, in.out, d_out, dq, dk, dv, p.shape(), p.shape());
    tasks = std::max(tasks, run.core.last_tasks());
    benchmark::DoNotOptimize(dq.data());
    benchmark::ClobberMemory();
  }
  // Exact: forward 4·n²·d, backward 10·n²·d (scores again, dV, dP, dQ, dK) per head (a window:
  // per visible pair, not n²).
  // Favor, LowRank and LSH: counted as three forwards.
  const bool exact =
      std::is_same_v<Policy, FullAttention<float>> || std::is_same_v<Policy, NaiveAttention<float>>;
  const double calls = double(state.iterations());
  const double work = (exact ? 3.5 : 3.0) * run.flops(p, calls);
  state.counters["GFLOPs"] = benchmark::Counter(work / 1e9, benchmark::Counter::kIsRate);
  state.counters["peak_fraction"] =
      benchmark::Counter(work / 1e9 / peak_gflops, benchmark::Counter::kIsRate);
  state.counters["scratch_bytes"] = double(run.core.scratch_peak_bytes());
  state.counters["saved_bytes"] = double(run.core.saved_bytes());
  state.counters["tasks"] = double(tasks);
  state.SetComplexityN(p.n);
}

template <class Policy, class Masking>
void train(benchmark::State& state, Problem p) {
  train_with<Policy, Masking>(state, p, bench_config<Policy>(p));
}

// One new token of one sequence against a cache (Full) or state (Favor) of `context` tokens:
// decode/<policy>/ctx:<context>/h:<heads>[/kv:<kv heads>]/d:<d>; kv_heads 0: heads.
template <class Policy>
void decode(benchmark::State& state, Problem p, Index kv_heads) {
  const Index context = p.n, width = p.heads * p.d;
  const Index kv_width = (kv_heads == 0 ? p.heads : kv_heads) * p.d;
  AttentionCore<Policy, Causal> core(bench_config<Policy>(p),
                                     HeadLayout{p.heads, p.d, p.d, 1, kv_heads});
  auto decoder = core.start_decoding(1);
  Matrix<float> prefix(context, width), prefix_kv(context, kv_width), q(1, width), k(1, kv_width),
      v(1, kv_width), out(1, width);
  CounterRng(1, 0).fill_normal(prefix);
  CounterRng(1, 4).fill_normal(prefix_kv);
  CounterRng(1, 1).fill_normal(q);
  CounterRng(1, 2).fill_normal(k);
  CounterRng(1, 3).fill_normal(v);
  Matrix<float> prefix_out(context, width);
  // The context less the new token, in two parts, so that the cache has room for the new token
  // (it grows by doubling) and no iteration times a reallocation.
  const Index half = context / 2, rest = context - 1 - half;
  core.decode(prefix.topRows(half), prefix_kv.topRows(half), prefix_kv.topRows(half),
              prefix_out.topRows(half), decoder);
  core.decode(prefix.middleRows(half, rest), prefix_kv.middleRows(half, rest),
              prefix_kv.middleRows(half, rest), prefix_out.middleRows(half, rest), decoder);
  for (auto _ : state) {
    core.decode(q, k, v, out, decoder);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    // The same token again next time: a cache forgets it (Favor's state costs the same at
    // any length, and keeps it).
    if constexpr (requires { decoder.states[0].k; }) {
      decoder.length -= 1;
      for (auto& st : decoder.states)
        st.length -= 1;
    }
  }
  state.counters["tasks"] = double(core.last_tasks());
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["scratch_bytes"] = double(core.scratch_peak_bytes());
  state.counters["cache_bytes"] = double(decoder.bytes());
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

// Full attention in a window of W keys (CausalWindow<W> or SlidingWindow<W>):
// attention[_train]/full_window<W>/…; GFLOPs count the visible (query, key) pairs only.
template <Index W>
void register_window(Index n, bool training) {
  for (const bool causal : {false, true}) {
    const Problem p{n, 8, 64, 1, causal};
    using Fn = void (*)(benchmark::State&, Problem);
    using Full = FullAttention<float>;
    const Fn fn =
        causal ? (training ? &train<Full, CausalWindow<W>> : &forward<Full, CausalWindow<W>>)
               : (training ? &train<Full, SlidingWindow<W>> : &forward<Full, SlidingWindow<W>>);
    const std::string policy = "full_window" + std::to_string(W);
    const std::string name =
        bench_name(training ? "attention_train" : "attention", policy.c_str(), p);
    benchmark::RegisterBenchmark(name.c_str(), fn, p)->UseRealTime()->Unit(benchmark::kMillisecond);
  }
}

// Full attention with a score modifier (ALiBi's default slopes, or a soft cap of 30 as Gemma 2's
// attention): attention[_train]/full_<variant>/…, the work counted as full attention's.
void register_scores(const char* variant, FullAttention<float>::Config config, Index n) {
  using Full = FullAttention<float>;
  for (const bool training : {false, true})
    for (const bool causal : {false, true}) {
      const Problem p{n, 8, 64, 1, causal};
      const std::string policy = std::string("full_") + variant;
      const std::string name =
          bench_name(training ? "attention_train" : "attention", policy.c_str(), p);
      benchmark::RegisterBenchmark(
          name.c_str(),
          [=](benchmark::State& state, Problem problem) {
            if (training && causal)
              train_with<Full, Causal>(state, problem, config);
            else if (training)
              train_with<Full, Bidirectional>(state, problem, config);
            else if (causal)
              forward_with<Full, Causal>(state, problem, config);
            else
              forward_with<Full, Bidirectional>(state, problem, config);
          },
          p)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
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

// One sequence, one head: the case where a head's work must be shared by the threads.
template <template <class> class Policy>
void register_one_head(const char* name, Index n) {
  for (const bool causal : {false, true}) {
    if (causal && !Policy<float>::supports_causal) continue;
    const Problem p{n, 1, 64, 1, causal};
    add<Policy<float>>(name, p, false);
    add<Policy<float>>(name, p, true);
  }
}

template <class Policy>
void register_decode(const char* name, Index context, Index heads = 1, Index kv_heads = 0) {
  const Problem p{context, heads, 64, 1, true};
  std::string full = std::string("decode/") + name + "/ctx:" + std::to_string(context) +
                     "/h:" + std::to_string(heads);
  if (kv_heads > 0) full += "/kv:" + std::to_string(kv_heads);
  benchmark::RegisterBenchmark((full + "/d:64").c_str(), decode<Policy>, p, kv_heads)
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
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
  for (const Index n : {4096, 16384}) {
    register_window<512>(n, false);
    register_window<512>(n, true);
  }
  register_scores("alibi", {.alibi = {.enabled = true}}, 4096);
  register_scores("softcap", {.softcap = 30}, 4096);
  register_one_head<FullAttention>("full", 4096);
  register_one_head<Favor>("favor", 4096);
  register_one_head<LowRank>("lowrank", 4096);
  register_one_head<LSHAttention>("lsh", 4096);
  register_decode<FullAttention<float>>("full", 16384);
  // Grouped key/value heads: 8 query heads over 8 (each its own), 2 and 1 (MQA) caches.
  for (const Index kv : {8, 2, 1})
    register_decode<FullAttention<float>>("full", 16384, 8, kv);
  register_decode<Favor<float>>("favor", 16384);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

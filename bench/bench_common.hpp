#pragma once
// What the benchmark binary and the policy comparison share: the problem setup, the
// policies under test and how their work is counted.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <string_view>
#include <utility>

#include <effattn/effattn.hpp>

#include "naive_attention.hpp"

namespace effattn::bench {

/// One benchmark problem: batch × heads attention over sequences of n tokens.
struct Problem {
  Index n = 1024;
  Index heads = 8;
  Index d = 64;
  Index batch = 1;
  bool causal = false;

  SequenceShape shape() const { return {batch, n}; }
  Index tokens() const { return batch * n; }
};

/// Projected Q, K, V of a problem ([tokens × heads·d]), seeded.
struct Inputs {
  Matrix<float> q, k, v, out;
  explicit Inputs(const Problem& p, std::uint64_t seed = 1)
      : q(p.tokens(), p.heads * p.d),
        k(p.tokens(), p.heads * p.d),
        v(p.tokens(), p.heads * p.d),
        out(p.tokens(), p.heads * p.d) {
    CounterRng(seed, 0).fill_normal(q);
    CounterRng(seed, 1).fill_normal(k);
    CounterRng(seed, 2).fill_normal(v);
  }
};

/// Floating-point work of exact attention, 4·n²·d per head (QKᵀ and PV), half when causal.
inline double exact_flops(const Problem& p) {
  const double f = 4.0 * double(p.n) * double(p.n) * double(p.d) * double(p.heads) * p.batch;
  return p.causal ? f / 2 : f;
}

/// FAVOR+'s work as the issue counts it: 8·n·m·d per head (features of q and k, and the two
/// products with the m × d state).
inline double favor_flops(const Problem& p, Index features = 256) {
  return 8.0 * double(p.n) * double(features) * double(p.d) * double(p.heads) * p.batch;
}

/// Rows LowRank projects the keys and values to in every benchmark (Linformer's k).
constexpr Index low_rank_k = 256;

/// Linformer's work as the issue counts it: 8·n·k·d per head (E·K, F·V and the attention's
/// two products over k rows). Pooling projections cost only O(n·d): 4·n·k·d.
inline double low_rank_flops(const Problem& p, bool dense = true) {
  const double k = double(std::min(low_rank_k, p.n));
  return (dense ? 8.0 : 4.0) * double(p.n) * k * double(p.d) * double(p.heads) * p.batch;
}

/// The configuration every benchmark uses: the defaults, except LowRank's projection, which
/// is sized for the problem: k = 256 rows of n_max = n (dense), or windows of n/256 tokens.
template <class Policy>
typename Policy::Config bench_config(const Problem& p) {
  typename Policy::Config config{};
  if constexpr (requires { typename Policy::Proj; }) {
    if constexpr (requires { config.projection.n_max; })
      config.projection = {.k = std::min(low_rank_k, p.n), .n_max = p.n};
    else
      config.projection = {.kernel = std::max<Index>(1, p.n / low_rank_k)};
  }
  return config;
}

/// The policy's own work per forward: exact attention's for the exact policies.
template <class Policy>
double policy_flops(const Problem& p) {
  if constexpr (requires { Policy::Map::width; })
    return favor_flops(p);
  else if constexpr (requires { typename Policy::Proj; })
    return low_rank_flops(p,
                          Policy::Proj::learned && std::string_view(Policy::Proj::name) == "dense");
  else
    return exact_flops(p);
}

/// (query, key) pairs a window lets through in one sequence of n tokens (attention/masking.hpp).
inline double window_pairs(Index n, KeyWindow w) {
  double pairs = 0;
  for (Index i = 0; i < n; ++i)
    pairs += double(std::min(n - 1, i + w.after) - std::max<Index>(0, i - w.before) + 1);
  return pairs;
}

/// Runs one forward of `Policy` over the whole problem through AttentionCore.
template <class Policy, class Masking>
struct Runner {
  AttentionCore<Policy, Masking> core;
  explicit Runner(const Problem& p) : Runner(p, bench_config<Policy>(p)) {}
  Runner(const Problem& p, typename Policy::Config config)
      : core(std::move(config), HeadLayout{p.heads, p.d, p.d, 1}) {}
  /// The keys: the queries themselves for a shared-QK policy (LSHAttention), as in its block.
  static const Matrix<float>& keys(const Inputs& in) {
    return detail::policy_shares_qk<Policy> ? in.q : in.k;
  }
  void forward(Inputs& in, const Problem& p, bool keep_saved = false) {
    core.forward(in.q, keys(in), in.v, in.out, p.shape(), p.shape(), keep_saved);
  }
  /// Work of the forwards since reset_work(): the policy's own count where it keeps one
  /// (LSHAttention's work depends on its buckets), else `calls` times policy_flops.
  void reset_work() {
    if constexpr (requires { core.policy().reset_work(); }) core.policy().reset_work();
  }
  double flops(const Problem& p, double calls) const {
    if constexpr (requires { core.policy().work(); })
      return core.policy().work().flops(p.d, p.d);
    else if constexpr (Masking::windowed)  // 4·d per visible (query, key) pair
      return calls * 4.0 * double(p.d) * double(p.heads) * double(p.batch) *
             window_pairs(p.n, Masking::keys());
    else
      return calls * policy_flops<Policy>(p);
  }
};

/// The machine's fp32 FMA peak in GFLOP/s on `threads` threads, measured: each thread runs a
/// register-only loop of independent fused multiply-adds at the native vector width (12
/// accumulators, enough to cover FMA latency on the cores we know), for about 0.2 s. Every
/// figure states it, so a fraction of peak means the same on AVX2 and AVX-512 machines.
inline double fma_peak_gflops(int threads) {
  using effattn::detail::simd::Vec;
  constexpr int lanes = effattn::detail::simd::width, chains = 12;
  constexpr long steps = 1 << 23;
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      Vec acc[chains];
      for (int c = 0; c < chains; ++c)
        acc[c] = effattn::detail::simd::broadcast(1.0f + 1e-3f * float(c));
      const Vec a = effattn::detail::simd::broadcast(0.999999f);
      const Vec b = effattn::detail::simd::broadcast(1e-7f);
      for (long i = 0; i < steps; ++i) {
#pragma GCC unroll 12
        for (int c = 0; c < chains; ++c)
          acc[c] = acc[c] * a + b;
      }
      for (int c = 0; c < chains; ++c)
        sink += acc[c][0];
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sink == 12345.0f) std::printf(" ");  // the result is used
    best = std::max(best, 2.0 * lanes * chains * double(steps) * threads / seconds / 1e9);
  }
  return best;
}

/// "CPU model, threads, compiler" for the header of every figure.
inline std::string machine_description(int threads) {
  std::string cpu = "unknown CPU";
  std::ifstream info("/proc/cpuinfo");
  for (std::string line; std::getline(info, line);)
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  return cpu + ", " + std::to_string(threads) + " threads, " +
#if defined(__clang__)
         "clang " __clang_version__
#elif defined(__GNUC__)
         "g++ " __VERSION__
#else
         "unknown compiler"
#endif
#ifdef __AVX512F__
         + ", AVX-512"
#elif defined(__AVX2__)
         + ", AVX2"
#endif
      ;
}

}  // namespace effattn::bench

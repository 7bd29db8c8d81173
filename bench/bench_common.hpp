#pragma once
// What the benchmark binary and the policy comparison share: the problem setup, the
// policies under test and how their work is counted.

#include <cstdint>
#include <fstream>
#include <string>

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

/// Runs one forward of `Policy` over the whole problem through AttentionCore.
template <class Policy, class Masking>
struct Runner {
  AttentionCore<Policy, Masking> core;
  explicit Runner(const Problem& p, typename Policy::Config config = {})
      : core(config, HeadLayout{p.heads, p.d, p.d, 1}) {}
  void forward(Inputs& in, const Problem& p, bool keep_saved = false) {
    core.forward(in.q, in.k, in.v, in.out, p.shape(), p.shape(), keep_saved);
  }
};

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

// The policy comparison: every attention policy at a few sequence lengths, one table.
// Run by `cmake --workflow --preset quickstart`; see docs/performance.md for how to read it.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "bench_common.hpp"

using namespace effattn;
using namespace effattn::bench;

namespace {

double peak = 1;  // the measured all-thread FMA peak, GFLOP/s

// ‖out − exact‖_F / ‖exact‖_F over a sample of query rows of every head, exact in double.
// With shared_qk (LSH), the exact function is shared-QK attention: keys k̂_j = q_j/‖q_j‖,
// a token's own key only when nothing else is visible.
double sampled_error(const Inputs& in, const Problem& p, bool shared_qk = false) {
  const Index samples = std::min<Index>(p.n, 128);
  const double scale = 1.0 / std::sqrt(double(p.d));
  double err = 0, norm = 0;
  for (Index h = 0; h < p.heads; ++h) {
    Eigen::MatrixXd k = (shared_qk ? in.q : in.k).middleCols(h * p.d, p.d).cast<double>();
    if (shared_qk) k.rowwise().normalize();
    const Eigen::MatrixXd v = in.v.middleCols(h * p.d, p.d).cast<double>();
    for (Index s = 0; s < samples; ++s) {
      const Index i = (s * (p.n - 1)) / std::max<Index>(samples - 1, 1);
      const Index visible = p.causal ? i + 1 : p.n;
      const Eigen::RowVectorXd q = in.q.block(i, h * p.d, 1, p.d).cast<double>();
      Eigen::VectorXd logits = scale * (k.topRows(visible) * q.transpose());
      if (shared_qk && visible > 1) logits[i] = -std::numeric_limits<double>::infinity();
      const Eigen::VectorXd w = (logits.array() - logits.maxCoeff()).exp();
      const Eigen::RowVectorXd exact = (w.transpose() * v.topRows(visible)) / w.sum();
      err += (in.out.block(i, h * p.d, 1, p.d).cast<double>() - exact).squaredNorm();
      norm += exact.squaredNorm();
    }
  }
  return std::sqrt(err / norm);
}

struct Row {
  std::string policy{};
  Problem problem{};
  double ms = 0, gflops = 0, scratch_mib = 0, error = 0;
  bool skipped = false;
  const char* error_note = nullptr;  // printed instead of the error
  std::string why;
};

template <class Policy, class Masking>
Row measure(const char* name, const Problem& p) {
  Inputs in(p, 7);
  Runner<Policy, Masking> run(p);
  run.forward(in, p);  // warm-up; sizes the workspaces
  run.core.reset_peak();
  run.reset_work();
  std::vector<double> times;
  double total = 0;
  while (times.size() < 3 || (times.size() < 7 && total < 1.0)) {
    const auto t0 = std::chrono::steady_clock::now();
    run.forward(in, p);
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    times.push_back(t);
    total += t;
  }
  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  Row row;
  row.policy = name;
  row.problem = p;
  row.ms = 1e3 * median;
  const double calls = double(times.size());
  row.gflops = run.flops(p, calls) / calls / median / 1e9;
  row.scratch_mib = double(run.core.scratch_peak_bytes()) / (1 << 20);
  row.error = sampled_error(in, p, detail::policy_shares_qk<Policy>);
  // Random, untrained E and F: the distance from exact attention would describe no model a
  // user trains (tests/test_low_rank.cpp checks the function it computes, to rounding).
  if (std::string_view(Policy::name) == "lowrank") row.error_note = "untrained";
  return row;
}

Row skipped(const char* name, const Problem& p, const char* why) {
  Row row;
  row.policy = name;
  row.problem = p;
  row.skipped = true;
  row.why = why;
  return row;
}

template <template <class> class Policy>
Row measure_policy(const char* name, const Problem& p) {
  using P = Policy<float>;
  if constexpr (P::supports_causal) {
    if (p.causal) return measure<P, Causal>(name, p);
  } else {
    if (p.causal) return skipped(name, p, "not causal");
  }
  return measure<P, Bidirectional>(name, p);
}

void print(const Row& r) {
  if (r.skipped) {
    std::printf("| %-7s | %6s | %7lld | %10s | %8s | %6s | %11s | %-10s |\n", r.policy.c_str(),
                r.problem.causal ? "yes" : "no", static_cast<long long>(r.problem.n), "-", "-", "-",
                "-", r.why.c_str());
    return;
  }
  char error[32];
  if (r.error_note)
    std::snprintf(error, sizeof error, "%s", r.error_note);
  else
    std::snprintf(error, sizeof error, "%.1e", r.error);
  std::printf("| %-7s | %6s | %7lld | %10.2f | %8.1f | %5.0f%% | %11.2f | %10s |\n",
              r.policy.c_str(), r.problem.causal ? "yes" : "no",
              static_cast<long long>(r.problem.n), r.ms, r.gflops, 100 * r.gflops / peak,
              r.scratch_mib, error);
  std::fflush(stdout);
}

}  // namespace

int main() {
  const int threads = max_threads();
  peak = fma_peak_gflops(threads);
  std::printf("effattn policy comparison: %s\n", machine_description(threads).c_str());
  std::printf("measured fp32 FMA peak: %.0f GFLOP/s on %d threads (%.0f on one)\n", peak, threads,
              fma_peak_gflops(1));
  std::printf(
      "fp32, batch 1, 8 heads of d = 64, attention core only (projections excluded).\n"
      "time: median wall time of 3-7 runs; GFLOP/s: the policy's own work per second;\n"
      "%% peak: GFLOP/s over the measured FMA peak; scratch: peak workspace of all threads; error: "
      "||out - exact|| / ||exact|| on 128\n"
      "query rows per head, exact attention computed naively in double.\n"
      "favor: m = 256 features. lowrank: dense k = 256 projections as initialised; Linformer\n"
      "learns E and F, so against exact attention these random ones would measure no model\n"
      "anyone trains: the column says 'untrained' (the tests check it computes the Linformer\n"
      "function to rounding).\n"
      "lsh: 4 rounds, chunks of 64, about 2n/64 buckets; its error is against exact\n"
      "shared-QK attention (keys = normalised queries), the function it approximates.\n\n");
  std::printf(
      "| policy  | causal |       n |  time (ms) |  GFLOP/s | %% peak | scratch MiB | rel. error "
      "|\n");
  std::printf(
      "|---------|--------|---------|------------|----------|--------|-------------|------------"
      "|\n");
  for (const bool causal : {false, true})
    for (const Index n : {1024, 4096, 16384}) {
      const Problem p{n, 8, 64, 1, causal};
      print(n <= 4096 ? measure_policy<NaiveAttention>("naive", p)
                      : skipped("naive", p, "n² memory"));
      print(measure_policy<FullAttention>("full", p));
      print(measure_policy<Favor>("favor", p));
      print(measure_policy<LowRank>("lowrank", p));
      print(measure_policy<LSHAttention>("lsh", p));
    }
  return 0;
}

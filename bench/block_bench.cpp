// Google Benchmark: stacks of transformer blocks, reversible against ordinary, forward and
// forward + backward. Names: block/<reversible|ordinary>/n:<n>/depth:<L>/train:<0|1>.
// Both stacks compute the same functions per block, F = PreNorm(causal exact attention) and
// G = PreNorm(feed-forward), with d_model 256, 4 heads, d_ff 1024:
//   reversible: [x | x] → L × Reversible<F, G> (on two halves of 256) → [y1 | y2]
//   ordinary:   x → L × (x + F(x), then x + G(x)) on 256 columns.
// Counters: tokens_per_s; activation_bytes (peak the activation meter saw: what layers held
// for backward); layer_scratch_bytes (peak of the calling thread's layer workspace).
#include <benchmark/benchmark.h>

#include <string>

#include "effattn/effattn.hpp"

using namespace effattn;

namespace {

constexpr Index d_model = 256;
using Attn = PreNorm<MultiHeadAttention<FullAttention<float>, Causal>>;
using FF = PreNorm<Chunked<FeedForward<float>>>;
using Reversible_ = Sequential<Duplicate<float>, Repeat<Reversible<Attn, FF>>, MergeHalves<float>>;
using Ordinary = Repeat<Sequential<Residual<Attn>, Residual<FF>>>;

Attn::Config attn_config() {
  return {.layer = {.d_model = d_model, .heads = 4}};
}
FF::Config ff_config() {
  return {.layer = {.layer = {.d_model = d_model, .d_ff = 4 * d_model}, .chunk = 256}};
}

Reversible_ make_reversible(Index depth) {
  return Reversible_({.d_model = d_model},
                     {.block = {.f = attn_config(), .g = ff_config()}, .depth = depth},
                     {.d_model = d_model});
}
Ordinary make_ordinary(Index depth) {
  return Ordinary({.block = {{{.layer = attn_config()}, {.layer = ff_config()}}}, .depth = depth});
}

template <class Stack>
void run(benchmark::State& state, Stack stack, Index n, bool train) {
  const SequenceShape shape{1, n, {}};
  Matrix<float> x(n, stack.d_in()), y(n, stack.d_out()), dy(n, stack.d_out()), dx(n, stack.d_in());
  CounterRng(1).fill_normal(x);
  CounterRng(2).fill_normal(dy);
  stack.set_training(train);
  auto step = [&] {
    stack.forward(x, y, shape);
    if (train) stack.backward(x, dy, dx, shape);
  };
  step();  // warms the workspaces
  activation_meter().reset_peak();
  layer_workspace().reset_peak();
  const std::size_t held = activation_meter().in_use();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(n) * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["activation_bytes"] = double(activation_meter().peak() - held);
  state.counters["layer_scratch_bytes"] = double(layer_workspace().peak_bytes());
}

void register_all() {
  for (Index n : {1024, 2048})
    for (Index depth : {1, 4, 12})
      for (int train : {0, 1}) {
        const std::string tail = "/n:" + std::to_string(n) + "/depth:" + std::to_string(depth) +
                                 "/train:" + std::to_string(train);
        benchmark::RegisterBenchmark(
            ("block/reversible" + tail).c_str(),
            [=](benchmark::State& s) { run(s, make_reversible(depth), n, train); })
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
        benchmark::RegisterBenchmark(
            ("block/ordinary" + tail).c_str(),
            [=](benchmark::State& s) { run(s, make_ordinary(depth), n, train); })
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}

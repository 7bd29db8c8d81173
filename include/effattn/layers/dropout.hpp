#pragma once
// Dropout with a counter-based mask: the same (seed, pass, row, column) always draws the same
// mask, so a reversible stack's recomputation drops exactly what its forward dropped.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/composition.hpp"
#include "effattn/layers/detail/decoding.hpp"
#include "effattn/layers/layer.hpp"

namespace effattn {

/// Inverted dropout: while on, y = x ⊙ m / (1 − rate) with m ∈ {0, 1} and P(m = 0) = rate;
/// while off (the default), y = x. Turn it on for a whole model with set_dropout(model, true)
/// (below), not with set_training: a reversible block runs its layers with set_training(false)
/// in its forward and true while recomputing them in backward, and both must drop alike.
///
/// The mask of element (row r, column c) is drawn from CounterRng(seed, pass) at (r, c): it
/// depends on nothing else, so a forward repeated before backward (the recomputation of a
/// Reversible block, a finite-difference check) draws the same mask, and backward uses it
/// without having kept it. `pass` advances after each backward while on, so every training
/// step draws a new mask; advance() draws a new one without a backward. Rows are numbered
/// within the call, so the layer is not position-wise (Chunked would repeat one chunk's mask).
/// Decoding never drops.
template <class S = float>
class Dropout {
 public:
  using Scalar = S;
  static constexpr bool position_wise = false;

  struct Config {
    Index d_model = 512;
    double rate = 0.1;       ///< probability of dropping an element, in [0, 1)
    std::uint64_t seed = 0;  ///< Repeat and Sequential give each block its own
  };

  explicit Dropout(Config config) : config_(config) {
    detail::require(config.d_model > 0, "Dropout", "d_model", config.d_model, "at least 1");
    detail::require(config.rate >= 0 && config.rate < 1, "Dropout", "rate", config.rate,
                    "a probability in [0, 1)");
    // P(drop) = threshold / 2^32 for a uniform 32-bit word.
    threshold_ = static_cast<std::uint64_t>(std::ldexp(config.rate, 32));
  }

  Index d_in() const { return config_.d_model; }
  Index d_out() const { return config_.d_model; }
  const Config& config() const { return config_; }

  void set_dropout(bool on) { on_ = on; }
  bool dropping() const { return on_ && threshold_ > 0; }
  /// The pass whose mask the next forward draws.
  std::uint64_t pass() const { return pass_; }
  void advance() { ++pass_; }

  void set_training(bool) {}  // keeps nothing: backward redraws the mask
  void release_activations() {}
  std::size_t activation_bytes() const { return 0; }
  void zero_grad() {}
  template <class F>
  void visit_parameters(F&&) {}

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_call("Dropout", x, d_in(), "y", y, d_out(), shape);
    apply(x, y);
  }
  /// dx = dy ⊙ m / (1 − rate) with the mask of the forward before it; then the next pass.
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("Dropout", x, d_in(), dy, d_out(), dx, shape);
    apply(dy, dx);
    if (dropping()) advance();
  }

  using Decoder = NoDecodeState;
  Decoder start_decoding(Index batch) const {
    detail::require(batch > 0, "Dropout", "batch", batch, "at least 1 sequence");
    return {};
  }
  void decode(ConstView<S> x, View<S> y, Decoder&) {
    detail::require_call("Dropout", x, d_in(), "y", y, d_out(), SequenceShape{1, x.rows(), {}});
    y = x;
  }

  /// Whether element (r, c) is kept in the current pass (for tests and inspection).
  bool kept(Index r, Index c) const {
    return !dropping() || word(CounterRng(config_.seed, pass_), r, c) >= threshold_;
  }

 private:
  static constexpr Index per_block = 4;  // 32-bit words in one 128-bit draw

  std::uint32_t word(const CounterRng& rng, Index r, Index c) const {
    const Index blocks = (config_.d_model + per_block - 1) / per_block;
    return rng.bits(static_cast<std::uint64_t>(r * blocks + c / per_block))[c % per_block];
  }

  void apply(ConstView<S> in, View<S> out) const {
    if (!dropping()) {
      out = in;
      return;
    }
    const CounterRng rng(config_.seed, pass_);
    const S scale = S(1.0 / (1.0 - config_.rate));
    const Index d = config_.d_model, blocks = (d + per_block - 1) / per_block;
    const int threads = in.size() >= (Index(1) << 15) ? max_threads() : 1;
    parallel_for(in.rows(), threads, [&](Index r, int) {
      for (Index b = 0; b < blocks; ++b) {
        const auto bits = rng.bits(static_cast<std::uint64_t>(r * blocks + b));
        for (Index c = b * per_block; c < std::min(d, (b + 1) * per_block); ++c)
          out(r, c) = bits[c % per_block] >= threshold_ ? in(r, c) * scale : S(0);
      }
    });
  }

  Config config_;
  std::uint64_t threshold_ = 0;
  std::uint64_t pass_ = 0;
  bool on_ = false;
};

static_assert(Layer<Dropout<float>>);

/// Turns every Dropout in `model` on or off (stacks and wrappers pass it on). Off by default;
/// on while training, off to evaluate.
template <class L>
void set_dropout(L& model, bool on) {
  detail::propagate_dropout(model, on);
}

}  // namespace effattn

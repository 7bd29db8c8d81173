#pragma once
// LearnedPositions: a learned table of absolute positions, added to the input.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/positions.hpp"
#include "effattn/layers/layer.hpp"

namespace effattn {

/// y = x + table.row(p) per token, p its position in its sequence (plus `offset`), with
/// table ∈ ℝ^{max_positions × d_model} drawn from N(0, 0.02²) (GPT-2's initialisation;
/// parameter `table`). Positions at or beyond max_positions are an effattn::Error. For long
/// sequences, AxialPositions factorises the table.
template <class S = float>
class LearnedPositions : public detail::PositionalEncoding<S> {
 public:
  using detail::PositionalEncoding<S>::offset;

  struct Config {
    Index d_model = 512;
    Index max_positions = 2048;
    std::uint64_t seed = 0;
  };

  explicit LearnedPositions(Config config) : config_(config) {
    detail::require(config.d_model > 0, "LearnedPositions", "d_model", config.d_model,
                    "at least 1");
    detail::require(config.max_positions > 0, "LearnedPositions", "max_positions",
                    config.max_positions, "at least 1");
    table_.resize(config.max_positions, config.d_model);
    CounterRng(config.seed, 1).fill_normal(table_, 0.02);
    grad_.setZero(config.max_positions, config.d_model);
  }

  Index d_in() const { return config_.d_model; }
  Index d_out() const { return config_.d_model; }
  const Config& config() const { return config_; }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_positions("LearnedPositions", x, y, d_in(), shape, offset,
                              config_.max_positions);
    detail::add_positions<S>(x, y, shape, offset, [&](Index p, auto& row) { row = table_.row(p); });
  }
  /// dx = dy; the table's rows get the sum of dy over the tokens at their position.
  /// The next tokens of each sequence, at the positions after those decoded so far.
  using typename detail::PositionalEncoding<S>::Decoder;
  void decode(ConstView<S> x, View<S> y, Decoder& decoder) {
    detail::decode_positions(*this, x, y, decoder);
  }
  void check_decode(Index rows, const Decoder& decoder) const {
    detail::check_decode_positions("LearnedPositions", rows, offset, config_.max_positions,
                                   decoder);
  }
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("LearnedPositions", x, d_in(), dy, d_out(), dx, shape);
    detail::require_positions("LearnedPositions", x, dx, d_in(), shape, offset,
                              config_.max_positions);
    for (Index b = 0; b < shape.batch; ++b) {  // padded rows reach no gradient
      const Index valid = shape.valid_length(b);
      grad_.middleRows(offset, valid) += dy.middleRows(b * shape.seq, valid);
    }
    dx = dy;
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("table"), table_, grad_);
  }
  void zero_grad() { grad_.setZero(); }

 private:
  Config config_;
  Matrix<S> table_, grad_;
};

static_assert(Layer<LearnedPositions<float>>);

}  // namespace effattn

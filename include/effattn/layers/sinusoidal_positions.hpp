#pragma once
// SinusoidalPositions: the Transformer's fixed positional encoding, added to the input.

#include <cmath>
#include <cstddef>
#include <string_view>

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/positions.hpp"
#include "effattn/layers/layer.hpp"

namespace effattn {

/// y = x + PE(p) per token, p its position in its sequence (plus `offset`, for decoding a
/// continuation): PE(p, 2i) = sin(p·ω_i), PE(p, 2i + 1) = cos(p·ω_i), ω_i = base^(−2i/d)
/// (Vaswani et al. 2017). No parameters; any length. Not position-wise (row t's output
/// depends on t), so Chunked does not take it.
template <class S = float>
class SinusoidalPositions : public detail::PositionalEncoding<S> {
 public:
  using detail::PositionalEncoding<S>::offset;

  struct Config {
    Index d_model = 512;
    double base = 10000;
  };

  explicit SinusoidalPositions(Config config) : config_(config) {
    detail::require(config.d_model > 0, "SinusoidalPositions", "d_model", config.d_model,
                    "at least 1");
    detail::require(std::isfinite(config.base) && config.base > 1, "SinusoidalPositions", "base",
                    config.base, "a finite value > 1");
  }

  Index d_in() const { return config_.d_model; }
  Index d_out() const { return config_.d_model; }
  const Config& config() const { return config_; }

  /// PE(p) into out (1 × d_model), computed in double.
  template <class Out>
  void encoding(Index p, Out&& out) const {
    const Index d = config_.d_model;
    for (Index c = 0; c < d; ++c) {
      const double omega = std::pow(config_.base, -double(c - c % 2) / double(d));
      out(c) = S(c % 2 == 0 ? std::sin(double(p) * omega) : std::cos(double(p) * omega));
    }
  }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_positions("SinusoidalPositions", x, y, d_in(), shape, offset, 0);
    detail::add_positions<S>(x, y, shape, offset, [&](Index p, auto& row) { encoding(p, row); });
  }
  /// The next tokens of each sequence, at the positions after those decoded so far.
  using typename detail::PositionalEncoding<S>::Decoder;
  void decode(ConstView<S> x, View<S> y, Decoder& decoder) {
    detail::decode_positions(*this, x, y, decoder);
  }
  void check_decode(Index rows, const Decoder& decoder) const {
    detail::check_decode_positions("SinusoidalPositions", rows, offset, 0, decoder);
  }
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("SinusoidalPositions", x, d_in(), dy, d_out(), dx, shape);
    dx = dy;
  }

  template <class F>
  void visit_parameters(F&&) {}
  void zero_grad() {}

 private:
  Config config_;
};

static_assert(Layer<SinusoidalPositions<float>>);

}  // namespace effattn

#pragma once
// AxialPositions: the Reformer's factorised learned positional embedding.

#include <array>
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

/// Axial positional embedding (Kitaev et al. 2020, §C; trax's AxialPositionalEncoding):
/// positions lie on a grid of shape = {n1, n2} (n1·n2 positions), position p at row
/// p / n2 and column p % n2, and its embedding is [E1.row(p / n2) ∣ E2.row(p % n2)] with
/// E1 ∈ ℝ^{n1 × d1}, E2 ∈ ℝ^{n2 × d2}, d1 + d2 = d_model (parameters `axis_0`, `axis_1`, drawn
/// from N(0, 0.02²)). So 2^20 positions of width 512 as {1024, 1024} with dims {256, 256}
/// cost 2·1024·256 values (2 MiB in float), not 2^20·512 (2 GiB). y = x + embedding per token,
/// p its position in its sequence plus `offset`.
template <class S = float>
class AxialPositions : public detail::PositionalEncoding<S> {
 public:
  using detail::PositionalEncoding<S>::offset;

  struct Config {
    Index d_model = 512;
    std::array<Index, 2> shape{64, 64};  ///< n1, n2: n1·n2 positions
    std::array<Index, 2> dims{0, 0};     ///< d1, d2 with d1 + d2 = d_model; {0, 0}: halves
    std::uint64_t seed = 0;
  };

  explicit AxialPositions(Config config) : config_(resolve(config)) {
    for (int a = 0; a < 2; ++a) {
      axes_[a].resize(config_.shape[a], config_.dims[a]);
      CounterRng(config_.seed, std::uint64_t(a + 1)).fill_normal(axes_[a], 0.02);
      grads_[a].setZero(config_.shape[a], config_.dims[a]);
    }
  }

  Index d_in() const { return config_.d_model; }
  Index d_out() const { return config_.d_model; }
  const Config& config() const { return config_; }
  Index max_positions() const { return config_.shape[0] * config_.shape[1]; }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_positions("AxialPositions", x, y, d_in(), shape, offset, max_positions());
    const Index n2 = config_.shape[1], d1 = config_.dims[0], d2 = config_.dims[1];
    detail::add_positions<S>(x, y, shape, offset, [&](Index p, auto& row) {
      row.head(d1) = axes_[0].row(p / n2);
      row.tail(d2) = axes_[1].row(p % n2);
    });
  }
  /// dx = dy; each axis row gets the sum of dy's part over the tokens on it.
  /// The next tokens of each sequence, at the positions after those decoded so far.
  using typename detail::PositionalEncoding<S>::Decoder;
  void decode(ConstView<S> x, View<S> y, Decoder& decoder) {
    detail::decode_positions(*this, x, y, decoder);
  }
  void check_decode(Index rows, const Decoder& decoder) const {
    detail::check_decode_positions("AxialPositions", rows, offset, max_positions(), decoder);
  }
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("AxialPositions", x, d_in(), dy, d_out(), dx, shape);
    detail::require_positions("AxialPositions", x, dx, d_in(), shape, offset, max_positions());
    const Index n2 = config_.shape[1], d1 = config_.dims[0], d2 = config_.dims[1];
    for (Index b = 0; b < shape.batch; ++b)
      for (Index t = 0; t < shape.valid_length(b); ++t) {  // padded rows reach no gradient
        const Index p = offset + t, r = b * shape.seq + t;
        grads_[0].row(p / n2) += dy.row(r).head(d1);
        grads_[1].row(p % n2) += dy.row(r).tail(d2);
      }
    dx = dy;
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("axis_0"), axes_[0], grads_[0]);
    f(std::string_view("axis_1"), axes_[1], grads_[1]);
  }
  void zero_grad() {
    for (auto& g : grads_)
      g.setZero();
  }

 private:
  static Config resolve(Config c) {
    constexpr const char* who = "AxialPositions";
    detail::require(c.d_model > 1, who, "d_model", c.d_model, "at least 2 (one column per axis)");
    if (c.dims[0] == 0 && c.dims[1] == 0) c.dims = {c.d_model / 2, c.d_model - c.d_model / 2};
    detail::require(c.dims[0] > 0 && c.dims[1] > 0 && c.dims[0] + c.dims[1] == c.d_model, who,
                    "dims", detail::concat("{", c.dims[0], ", ", c.dims[1], "}"),
                    detail::concat("two widths ≥ 1 adding up to d_model = ", c.d_model));
    detail::require(c.shape[0] > 0 && c.shape[1] > 0, who, "shape",
                    detail::concat("{", c.shape[0], ", ", c.shape[1], "}"), "two axis lengths ≥ 1");
    return c;
  }

  Config config_;
  std::array<Matrix<S>, 2> axes_, grads_;
};

static_assert(Layer<AxialPositions<float>>);

}  // namespace effattn

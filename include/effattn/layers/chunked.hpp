#pragma once
// Chunked<L>: a position-wise layer applied c tokens at a time (Reformer's chunked
// feed-forward), so its wide hidden activation never exists for all tokens at once.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/composition.hpp"
#include "effattn/layers/layer.hpp"
#include "effattn/layers/layer_workspace.hpp"

namespace effattn {

/// Applies L to rows [0, c), [c, 2c), … (the last chunk may be shorter; chunks may cross
/// sequence boundaries, which a position-wise layer cannot tell). Forward keeps nothing,
/// even when training; backward recomputes each chunk's forward (docs/algorithms.md §6) and
/// releases it before the next, so the peak hidden memory is O(c · d_hidden) in both
/// directions, at the price of one more forward of L.
template <class L>
class Chunked : public detail::Wrapper<L> {
  static_assert(detail::assert_layer<L>(), "Chunked<L>: L must be a layer");
  static_assert(L::position_wise,
                "effattn: Chunked<L> needs a position-wise layer (output row t computed from "
                "input row t alone); this layer mixes positions, as attention does, so applying "
                "it a chunk of tokens at a time would change what it computes.");

 public:
  using Scalar = typename L::Scalar;
  using S = Scalar;
  static constexpr bool position_wise = true;
  static constexpr std::string_view parameter_group = detail::parameter_group<L>();

  struct Config {
    typename L::Config layer{};  ///< the wrapped layer's
    Index chunk = 128;           ///< tokens per chunk
    Config reseeded(std::uint64_t salt) const { return {detail::reseed(layer, salt), chunk}; }
  };

  explicit Chunked(Config config) : detail::Wrapper<L>(config.layer), chunk_(config.chunk) {
    detail::require(chunk_ > 0, "Chunked", "chunk", chunk_, "at least 1 token");
  }

  Index d_in() const { return fn_.d_in(); }
  Index d_out() const { return fn_.d_out(); }
  Index chunk() const { return chunk_; }

  void set_training(bool on) { training_ = on; }
  bool training() const { return training_; }
  void release_activations() { forwarded_rows_ = -1; }
  std::size_t activation_bytes() const { return 0; }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    detail::require_call("Chunked", x, d_in(), "y", y, d_out(), shape);
    for_each_chunk(x.rows(), [&](Index r0, Index m) {
      fn_.forward(x.middleRows(r0, m), y.middleRows(r0, m), SequenceShape{1, m, {}});
    });
    forwarded_rows_ = training_ ? x.rows() : -1;
  }

  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    detail::require_backward_call("Chunked", x, d_in(), dy, d_out(), dx, shape);
    check_call(shape, true);
    fn_.set_training(true);
    // Chunks of the valid rows only: a padded row reaches no gradient, and its dx is 0.
    shape.zero_padding(dx);
    shape.for_each_valid_run([&](Index start, Index run) {
      for_each_chunk(run, [&](Index r0, Index m) {
        r0 += start;
        Workspace& ws = layer_workspace();
        const Workspace::Frame frame(ws);
        auto y = ws.matrix<S>(m, d_out());
        const SequenceShape part{1, m, {}};
        fn_.forward(x.middleRows(r0, m), y, part);
        fn_.backward(x.middleRows(r0, m), dy.middleRows(r0, m), dx.middleRows(r0, m), part);
        fn_.release_activations();
      });
    });
    fn_.set_training(false);
  }

  /// Backward needs a training forward on as many tokens (the layer itself runs on chunks,
  /// whose shapes it always accepts).
  void check_call(const SequenceShape& shape, bool backward) const {
    if (backward)
      detail::require_forward(training_ && forwarded_rows_ == shape.tokens(), "Chunked");
  }

  template <class V>
  void visit_parameters(V&& f) {
    fn_.visit_parameters(f);  // a chunked layer's parameters are the layer's, names unchanged
  }

 private:
  using detail::Wrapper<L>::fn_;

  template <class F>
  void for_each_chunk(Index rows, F&& f) {
    for (Index r0 = 0; r0 < rows; r0 += chunk_)
      f(r0, std::min(chunk_, rows - r0));
  }

  Index chunk_;
  Index forwarded_rows_ = -1;
  bool training_ = false;
};

}  // namespace effattn

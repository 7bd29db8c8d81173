#pragma once
// StackOps: what Repeat and Sequential share (training, backward, the reversible walk).

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/layers/activation_meter.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/detail/composition.hpp"
#include "effattn/layers/detail/decoding.hpp"
#include "effattn/layers/layer_workspace.hpp"

namespace effattn {
namespace detail {

/// What Repeat and Sequential share. The derived stack provides count(), visit(i, f) and
/// `static constexpr bool reversible` (every block is a ReversibleLayer).
///
/// Training, ordinary stack: every block trains and keeps what its backward needs, and the
/// stack keeps each block's input (activation_bytes says how much: it grows with depth).
/// Backward walks down, releasing each block's activations as soon as they are used.
/// Training, reversible stack: blocks keep nothing; the stack keeps its output only, and
/// backward rebuilds each block's input from its output (Reversible::backward_from_output),
/// so activation memory does not depend on depth.
template <class Derived, class S>
class StackOps {
 public:
  using Scalar = S;

  Index d_in() const { return width_in(0); }
  Index d_out() const { return width_out(self().count() - 1); }

  void set_training(bool on) {
    training_ = on;
    if (!Derived::reversible) for_each([&](auto& b) { b.set_training(on); });
    if (!on) release_activations();
  }
  bool training() const { return training_; }
  void release_activations() {
    inputs_.clear();
    top_.resize(0, 0);
    held_.set(0);
    for_each([](auto& b) { b.release_activations(); });
  }
  std::size_t activation_bytes() const {
    std::size_t bytes = held_.bytes();
    for_each([&](const auto& b) { bytes += b.activation_bytes(); });
    return bytes;
  }
  void zero_grad() {
    for_each([](auto& b) { b.zero_grad(); });
  }
  void set_dropout(bool on) {
    for_each([&](auto& b) { detail::propagate_dropout(b, on); });
  }
  template <class F>
  void visit_parameters(F&& f) {
    for (Index i = 0; i < self().count(); ++i)
      self().visit(i, [&](auto& b) { visit_prefixed(b, "block." + std::to_string(i), f); });
  }
  template <class F>
  void visit_random_state(F&& f) {
    for (Index i = 0; i < self().count(); ++i)
      self().visit(i, [&](auto& b) { visit_random_state_of(b, "block." + std::to_string(i), f); });
  }

  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    require_call(Derived::name, x, d_in(), "y", y, d_out(), shape);
    check_call(shape, false);
    const Index n = self().count();
    if (training_ && !Derived::reversible) {  // keep every block's input
      try {
        inputs_.resize(static_cast<std::size_t>(n - 1));
        for (Index i = 0; i < n; ++i) {
          if (i + 1 < n) inputs_[i].resize(x.rows(), width_out(i));
          ConstView<S> in = i == 0 ? x : ConstView<S>(inputs_[i - 1]);
          View<S> out = i + 1 == n ? y : View<S>(inputs_[i]);
          self().visit(i, [&](auto& b) { b.forward(in, out, shape); });
          held_.set(kept_bytes());
        }
      } catch (...) {  // past the checks (e.g. out of memory): keep nothing half-made
        release_activations();
        throw;
      }
      return;
    }
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    auto a = ws.matrix<S>(x.rows(), widest()), b = ws.matrix<S>(x.rows(), widest());
    for (Index i = 0; i < n; ++i) {
      ConstView<S> in = i == 0 ? x : ConstView<S>(((i % 2) ? a : b).leftCols(width_in(i)));
      View<S> out = i + 1 == n ? y : View<S>(((i % 2) ? b : a).leftCols(width_out(i)));
      self().visit(i, [&](auto& blk) { blk.forward(in, out, shape); });
    }
    if (training_) {  // reversible: the output is all backward needs
      top_ = y;
      held_.set(kept_bytes());
    }
  }

  /// Incremental decoding (Derived::start_decoding makes the decoder): the next m tokens of
  /// every sequence, x [batch·m × d_in], through every block in turn. Not in training mode.
  /// What decode would reject, for every block before any decoder moves: a retried call does
  /// not feed a cache the same tokens twice.
  template <class Decoder>
  void check_decode(Index rows, const Decoder& decoder) const {
    require_not_training(self(), Derived::name);
    for (Index i = 0; i < self().count(); ++i)
      self().visit_decoding(i, decoder, [&](const auto& blk, const auto& dec) {
        detail::check_decode(blk, rows, dec);
      });
  }
  template <class Decoder>
  void decode(ConstView<S> x, View<S> y, Decoder& decoder) {
    require_call(Derived::name, x, d_in(), "y", y, d_out(), SequenceShape{1, x.rows(), {}});
    check_decode(x.rows(), decoder);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    auto a = ws.matrix<S>(x.rows(), widest()), b = ws.matrix<S>(x.rows(), widest());
    for (Index i = 0; i < self().count(); ++i) {
      ConstView<S> in = i == 0 ? x : ConstView<S>(((i % 2) ? a : b).leftCols(width_in(i)));
      View<S> out = i + 1 == self().count() ? y : View<S>(((i % 2) ? b : a).leftCols(width_out(i)));
      self().visit_decoding(i, decoder,
                            [&](auto& blk, auto& dec) { detail::decode(blk, in, out, dec); });
    }
  }

  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    require_backward_call(Derived::name, x, d_in(), dy, d_out(), dx, shape);
    check_call(shape, true);
    if constexpr (Derived::reversible) {
      Workspace& ws = layer_workspace();
      const Workspace::Frame frame(ws);
      auto rebuilt = ws.matrix<S>(x.rows(), d_in());
      walk_down(top_, dy, rebuilt, dx, shape);
      return;
    } else {
      Workspace& ws = layer_workspace();
      const Workspace::Frame frame(ws);
      auto a = ws.matrix<S>(x.rows(), widest()), b = ws.matrix<S>(x.rows(), widest());
      for (Index i = self().count() - 1; i >= 0; --i) {
        ConstView<S> in = i == 0 ? x : ConstView<S>(inputs_[i - 1]);
        ConstView<S> d_out =
            i + 1 == self().count() ? dy : ConstView<S>(((i % 2) ? a : b).leftCols(width_out(i)));
        View<S> d_in = i == 0 ? dx : View<S>(((i % 2) ? b : a).leftCols(width_in(i)));
        self().visit(i, [&](auto& blk) {
          blk.backward(in, d_out, d_in, shape);
          blk.release_activations();
        });
        if (i > 0) inputs_[i - 1].resize(0, 0);
        held_.set(kept_bytes());
      }
      inputs_.clear();
    }
  }

  /// Runs every block's check (layers/layer.hpp): a call the stack would reject fails here,
  /// before any block has run. A reversible stack's backward runs its blocks forward again.
  void check_call(const SequenceShape& shape, bool backward) const {
    if (backward) require_forward(training_ && kept(shape.tokens()), Derived::name);
    for_each(
        [&](const auto& b) { detail::check_call(b, shape, backward && !Derived::reversible); });
  }

  /// Reversible stacks: x = the input whose forward is y.
  void inverse(ConstView<S> y, View<S> x, const SequenceShape& shape) {
    static_assert(Derived::reversible, "effattn: inverse needs a stack of reversible blocks");
    require_call(Derived::name, y, d_out(), "x", x, d_in(), shape, "y");
    check_call(shape, false);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    auto a = ws.matrix<S>(y.rows(), widest()), b = ws.matrix<S>(y.rows(), widest());
    for (Index i = self().count() - 1; i >= 0; --i) {
      ConstView<S> out =
          i + 1 == self().count() ? y : ConstView<S>(((i % 2) ? a : b).leftCols(width_out(i)));
      View<S> in = i == 0 ? x : View<S>(((i % 2) ? b : a).leftCols(width_in(i)));
      self().visit(i, [&](auto& blk) { blk.inverse(out, in, shape); });
    }
  }

  /// Reversible stacks: from the output and its gradient, the input and its gradient.
  void backward_from_output(ConstView<S> y, ConstView<S> dy, View<S> x, View<S> dx,
                            const SequenceShape& shape) {
    static_assert(Derived::reversible,
                  "effattn: backward_from_output needs a stack of reversible blocks");
    require_backward_from_output_call(Derived::name, y, d_out(), dy, x, dx, d_in(), shape);
    check_call(shape, false);
    walk_down(y, dy, x, dx, shape);
  }

 protected:
  // Checks that each block's output is as wide as the next block's input.
  void check_widths() const {
    for (Index i = 0; i + 1 < self().count(); ++i)
      require(width_out(i) == width_in(i + 1), Derived::name, concat("block ", i + 1),
              concat("a layer taking ", width_in(i + 1), " columns"),
              concat("the width block ", i, " gives, ", width_out(i), " columns"));
  }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
  Derived& self() { return static_cast<Derived&>(*this); }

  template <class F>
  void for_each(F&& f) {
    for (Index i = 0; i < self().count(); ++i)
      self().visit(i, f);
  }
  template <class F>
  void for_each(F&& f) const {
    for (Index i = 0; i < self().count(); ++i)
      self().visit(i, f);
  }
  Index width_in(Index i) const {
    Index w = 0;
    self().visit(i, [&](const auto& b) { w = b.d_in(); });
    return w;
  }
  Index width_out(Index i) const {
    Index w = 0;
    self().visit(i, [&](const auto& b) { w = b.d_out(); });
    return w;
  }
  Index widest() const {
    Index w = 0;
    for (Index i = 0; i < self().count(); ++i)
      w = std::max({w, width_in(i), width_out(i)});
    return w;
  }
  // What a training forward on `rows` tokens kept for backward is all there.
  bool kept(Index rows) const {
    if (Derived::reversible) return top_.rows() == rows;
    return inputs_.size() + 1 == std::size_t(self().count()) &&
           (inputs_.empty() || inputs_.front().rows() == rows);
  }
  std::size_t kept_bytes() const {
    std::size_t bytes = sizeof(S) * static_cast<std::size_t>(top_.size());
    for (const auto& m : inputs_)
      bytes += sizeof(S) * static_cast<std::size_t>(m.size());
    return bytes;
  }

  // Reversible backward: each block rebuilds its input from its output, top to bottom.
  void walk_down(ConstView<S> y, ConstView<S> dy, View<S> x, View<S> dx,
                 const SequenceShape& shape) {
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    const Index rows = y.rows(), w = widest();
    auto ya = ws.matrix<S>(rows, w), yb = ws.matrix<S>(rows, w);
    auto da = ws.matrix<S>(rows, w), db = ws.matrix<S>(rows, w);
    for (Index i = self().count() - 1; i >= 0; --i) {
      const bool top = i + 1 == self().count(), odd = i % 2;
      ConstView<S> out = top ? y : ConstView<S>((odd ? ya : yb).leftCols(width_out(i)));
      ConstView<S> d_out = top ? dy : ConstView<S>((odd ? da : db).leftCols(width_out(i)));
      View<S> in = i == 0 ? x : View<S>((odd ? yb : ya).leftCols(width_in(i)));
      View<S> d_in = i == 0 ? dx : View<S>((odd ? db : da).leftCols(width_in(i)));
      self().visit(i, [&](auto& blk) { blk.backward_from_output(out, d_out, in, d_in, shape); });
    }
  }

  std::vector<Matrix<S>> inputs_;  // ordinary training: the input of blocks 1 … n−1
  Matrix<S> top_;                  // reversible training: the stack's output
  HeldActivations held_;
  bool training_ = false;
};

}  // namespace detail

}  // namespace effattn

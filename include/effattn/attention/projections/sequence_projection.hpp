#pragma once
// The SequenceProjection concept: what LowRank (Linformer) needs of a projection along the
// sequence, which maps n tokens to a few rows.

#include <concepts>
#include <cstddef>
#include <string_view>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// A projection type P<S> maps x [n × w] (keys or values of one head) to y [rows(n) × w]:
///   Config                      its settings
///   P(Config, CounterRng)       construction; learned projections draw their weights
///   rows(n)                     output rows for n tokens
///   visible_rows(n, valid)      output rows that see at least one of the first `valid`
///                               tokens (the rest are wholly padding and get masked)
///   check(component, n)         effattn::Error if n tokens cannot be projected
///   scratch_bytes(n, w)         workspace its forward or backward takes
///   forward(x, valid, y, ws)    rows of x at or past `valid` are padding: treated as zero
///   backward(x, valid, dy, dx, ws)  writes dx (0 on padding); a learned projection also adds
///                               to its gradient, under a lock
///   forward_rows(x, valid, y, row, ws)  optional: rows [row, row + y.rows()) of forward's
///                               y alone (LowRank's forward then runs them as blocks)
///   backward_rows(dy, dx, column, ws), add_gradient_columns(x, dy, column, ws),
///   prepare_gradient()          optional, together: backward's dx rows and (learned) its
///                               gradient's columns for the tokens at [column, column + n),
///                               the gradient without a lock (LowRank's backward then runs
///                               blocks of tokens as tasks; see DenseProjection)
///   learned                     whether it has parameters; a learned projection also has
///                               visit_parameters(f, label) and zero_grad()
template <class P>
concept SequenceProjection = requires(P& p, const P& cp, const typename P::Config& config,
                                      ConstView<typename P::Scalar> x, View<typename P::Scalar> y,
                                      Index n, Workspace& ws) {
  typename P::Config;
  requires std::constructible_from<P, const typename P::Config&, CounterRng>;
  { P::learned } -> std::convertible_to<bool>;
  { cp.rows(n) } -> std::convertible_to<Index>;
  { cp.visible_rows(n, n) } -> std::convertible_to<Index>;
  cp.check(std::string_view{}, n);
  { cp.scratch_bytes(n, n) } -> std::convertible_to<std::size_t>;
  cp.forward(x, n, y, ws);
  p.backward(x, n, x, y, ws);
};

}  // namespace effattn

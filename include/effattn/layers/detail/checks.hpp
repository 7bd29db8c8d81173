#pragma once
// The checks every layer runs on a call before it writes anything: widths, rows, shape,
// separate memory, a training forward before backward, and the optional check_call hook.

#include "effattn/core/aliasing.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"

namespace effattn::detail {

/// Checks that a matrix argument is rows × cols.
template <class M>
void require_matrix(const char* component, const char* argument, const M& m, Index rows,
                    Index cols) {
  require(m.rows() == rows && m.cols() == cols, component, argument,
          concat("a ", m.rows(), "×", m.cols(), " matrix"),
          concat("a ", rows, "×", cols, " matrix"));
}

/// Checks a layer call: the input (`x_name`, default x) is [shape.tokens() × d_in] and the
/// output y (or dx) is [tokens × width], in memory of its own.
template <class X, class Y>
void require_call(const char* component, const X& x, Index d_in, const char* y_name, const Y& y,
                  Index y_cols, const SequenceShape& shape, const char* x_name = "x") {
  require(x.cols() == d_in, component, x_name, concat("a matrix of ", x.cols(), " columns"),
          concat(x_name[0] == 'x' ? "d_in = " : "d_out = ", d_in, " columns"));
  shape.validate_rows(component, "shape", x_name, x.rows());
  require_matrix(component, y_name, y, x.rows(), y_cols);
  require_disjoint(component, y_name, y, x_name, x);
}

/// Checks a layer's backward(x, dy, dx, shape): as require_call, and dy is [tokens × d_out]
/// and dx shares memory with neither x nor dy.
template <class X, class DY, class DX>
void require_backward_call(const char* component, const X& x, Index d_in, const DY& dy, Index d_out,
                           const DX& dx, const SequenceShape& shape) {
  require_call(component, x, d_in, "dx", dx, d_in, shape);
  require_matrix(component, "dy", dy, x.rows(), d_out);
  require_disjoint(component, "dx", dx, "dy", dy);
}

/// Checks backward_from_output(y, dy, x, dx, shape) of a reversible layer or stack: y and dy
/// are inputs, x and dx outputs, and no output shares memory with another argument.
template <class Y, class DY, class X, class DX>
void require_backward_from_output_call(const char* component, const Y& y, Index d_out, const DY& dy,
                                       const X& x, const DX& dx, Index d_in,
                                       const SequenceShape& shape) {
  require_call(component, y, d_out, "x", x, d_in, shape, "y");
  require_matrix(component, "dy", dy, y.rows(), d_out);
  require_matrix(component, "dx", dx, y.rows(), d_in);
  require_disjoint(component, "x", x, "dy", dy);
  require_disjoint(component, "dx", dx, "y", y);
  require_disjoint(component, "dx", dx, "dy", dy);
  require_disjoint(component, "dx", dx, "x", x);
}

/// A layer may have `check_call(shape, backward) const`: it throws the Error its forward
/// (backward = false) or backward (true) would throw for this shape beyond the widths and
/// rows every layer checks, and changes nothing. Stacks and wrappers run it on everything
/// they hold before their first write, so a rejected call leaves the whole model as it
/// was. A layer without one accepts every shape its widths allow.
template <class L>
void check_call(const L& layer, const SequenceShape& shape, bool backward) {
  if constexpr (requires { layer.check_call(shape, backward); }) layer.check_call(shape, backward);
}

/// Backward needs a training forward before it.
inline void require_forward(bool ok, const char* component) {
  require(ok, component, "backward", "called without a preceding training forward",
          "set_training(true), then forward, then backward");
}

}  // namespace effattn::detail

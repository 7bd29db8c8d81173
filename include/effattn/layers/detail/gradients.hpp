#pragma once
// Parameter gradients summed over the valid (non-padding) rows only, so that a padded row
// reaches no gradient whatever it holds (core/sequence_shape.hpp).

#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"

namespace effattn::detail {

/// gw += xᵀ·dy over the valid rows of `shape`.
template <class G, class X, class D>
void add_weight_gradient(G& gw, const X& x, const D& dy, const SequenceShape& shape) {
  shape.for_each_valid_run([&](Index r0, Index rows) {
    gw.noalias() += x.middleRows(r0, rows).transpose() * dy.middleRows(r0, rows);
  });
}

/// gb (1 × d) += the column sums of dy over the valid rows of `shape`.
template <class G, class D>
void add_bias_gradient(G& gb, const D& dy, const SequenceShape& shape) {
  shape.for_each_valid_run(
      [&](Index r0, Index rows) { gb.row(0) += dy.middleRows(r0, rows).colwise().sum(); });
}

}  // namespace effattn::detail

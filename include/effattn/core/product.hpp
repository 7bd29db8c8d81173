#pragma once
// Matrix products inside kernels, sliced so that Eigen never allocates.

#include <algorithm>
#include <type_traits>

#include "effattn/core/types.hpp"

namespace effattn::detail {

/// Scalars Eigen may pack on the stack for one operand of a product
/// (EIGEN_STACK_ALLOCATION_LIMIT bytes, 128 KiB unless the user changed it).
template <class S>
constexpr Index stack_pack_scalars = EIGEN_STACK_ALLOCATION_LIMIT / sizeof(S);

/// Rows Eigen may add when it rounds a packed panel up to its register block.
constexpr Index pack_row_rounding = 48;

/// dst = lhs · rhs (Accumulate: dst += lhs · rhs), computed in slices along the inner
/// dimension. Why: Eigen packs each operand of a product into a buffer that lives on the
/// stack up to EIGEN_STACK_ALLOCATION_LIMIT and on the heap above it; a tile × tile product
/// (P·V in attention) would otherwise allocate on every call. Each slice's panels,
/// (rows + rounding) × slice and slice × cols, stay within the stack buffer.
template <bool Accumulate, class Dst, class Lhs, class Rhs>
void sliced_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  using S = typename std::decay_t<Dst>::Scalar;
  const Index depth = lhs.cols();
  const Index widest = std::max(lhs.rows() + pack_row_rounding, rhs.cols());
  const Index slice = std::max<Index>(1, std::min(depth, stack_pack_scalars<S> / widest));
  for (Index k0 = 0; k0 < depth; k0 += slice) {
    const Index kk = std::min(slice, depth - k0);
    if (!Accumulate && k0 == 0)
      dst.noalias() = lhs.middleCols(k0, kk) * rhs.middleRows(k0, kk);
    else
      dst.noalias() += lhs.middleCols(k0, kk) * rhs.middleRows(k0, kk);
  }
}

}  // namespace effattn::detail

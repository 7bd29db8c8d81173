#pragma once
// Products: dst = a·b (or +=) for Eigen operands on the micro-kernel, packing b into a buffer
// taken once from the workspace.

#include <cstddef>
#include <type_traits>
#include <utility>

#include "effattn/core/micro_kernel.hpp"
#include "effattn/core/product.hpp"
#include "effattn/core/simd.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail {

/// The products of a kernel whose operands are blocks (and transposes of blocks) of matrices:
/// in float with GCC/Clang, b is packed into panels and the product runs on the micro-kernel,
/// reading a (row-major or transposed) in place through its strides; otherwise, and for
/// operands that are expressions rather than blocks, Eigen's product (sliced_product). The
/// pack buffer is taken from the workspace once, with room for the largest b the kernel will
/// use (capacity(depth, cols) for b of depth × cols), so a kernel makes any number of
/// products without allocating.
template <class S>
class Products {
 public:
  static constexpr bool packed = std::is_same_v<S, float> && simd::enabled;

  /// Floats the packed form of a depth × cols operand b takes.
  static Index capacity(Index depth, Index cols) { return kernel::padded(cols) * depth; }
  /// Workspace the constructor takes for a buffer of `floats`.
  static std::size_t bytes(Index floats) {
    return packed ? Workspace::bytes_for<float>(floats) : 0;
  }

  /// Products whose b packs into `floats` (the largest capacity(depth, cols) they will use).
  Products(Workspace& ws, Index floats) {
    if constexpr (packed) {
      capacity_ = floats;
      pack_ = ws.take<float>(capacity_);
    }
  }

  /// dst = a·b. dst must not overlap a or b.
  template <class D, class A, class B>
  void assign(D&& dst, const A& a, const B& b) const {
    run<false>(std::forward<D>(dst), a, b);
  }
  /// dst += a·b. dst must not overlap a or b.
  template <class D, class A, class B>
  void add(D&& dst, const A& a, const B& b) const {
    run<true>(std::forward<D>(dst), a, b);
  }

 private:
  template <bool Accumulate, class D, class A, class B>
  void run(D&& dst, const A& a, const B& b) const {
    if constexpr (packed && direct<A> && direct<B> && std::decay_t<D>::IsRowMajor) {
      const Index m = dst.rows(), n = dst.cols(), k = a.cols();
      if (m == 0 || n == 0) return;
      if (k == 0) {
        if (!Accumulate) dst.setZero();
        return;
      }
      eigen_assert(capacity(k, n) <= capacity_ && dst.innerStride() == 1);
      pack(b, k, n);
      kernel::gemm(m, n, k, {a.data(), a.rowStride(), a.colStride()}, pack_, kernel::panel * k,
                   dst.data(), dst.outerStride(),
                   Accumulate ? kernel::Update::add : kernel::Update::assign);
    } else {
      sliced_product<Accumulate>(std::forward<D>(dst), a, b);
    }
  }

  template <class X>
  static constexpr bool direct = (Eigen::internal::traits<X>::Flags & Eigen::DirectAccessBit) != 0;

  // b (k × n) into panels: B[t][c] = b(t, c).
  template <class B>
  void pack(const B& b, Index k, Index n) const {
    if (b.colStride() == 1) {
      kernel::pack_rows(b.data(), b.rowStride(), k, n, pack_);
    } else if (b.rowStride() == 1) {
      kernel::pack_transposed(b.data(), b.colStride(), n, k, pack_);
    } else {
      for (Index p0 = 0; p0 < n; p0 += kernel::panel)
        for (Index t = 0; t < k; ++t)
          for (Index c = 0; c < kernel::panel; ++c)
            pack_[p0 * k + t * kernel::panel + c] = p0 + c < n ? b(t, p0 + c) : 0.0f;
    }
  }

  float* pack_ = nullptr;
  Index capacity_ = 0;
};

}  // namespace effattn::detail

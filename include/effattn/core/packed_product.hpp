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
/// products without allocating. An operand used by many products while it does not change (a
/// weight; a state between its updates) is packed once with keep() and passed as a Kept.
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

  /// An operand b packed once by keep(): valid while b's values are unchanged and the
  /// workspace frame that was open when it was kept is alive.
  class Kept {
    friend class Products;
    const S* data_ = nullptr;  // b itself, read by Eigen's path
    Index depth_ = 0, cols_ = 0, row_stride_ = 0, col_stride_ = 0;
    const float* panels_ = nullptr;  // b packed, read by the micro-kernel
    auto map() const {
      using Strided = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
      return Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>, 0, Strided>(
          data_, depth_, cols_, Strided(col_stride_, row_stride_));
    }
  };
  /// Workspace keep() takes for a depth × cols operand.
  static std::size_t kept_bytes(Index depth, Index cols) { return bytes(capacity(depth, cols)); }

  /// b (a block of a matrix, or its transpose) packed into workspace memory of its own.
  template <class B>
  Kept keep(Workspace& ws, const B& b) const {
    static_assert(direct<B>, "effattn: Products::keep takes a block of a matrix or its transpose");
    Kept kept;
    kept.data_ = b.data();
    kept.depth_ = b.rows();
    kept.cols_ = b.cols();
    kept.row_stride_ = b.rowStride();
    kept.col_stride_ = b.colStride();
    if constexpr (packed) {
      float* panels = ws.take<float>(capacity(b.rows(), b.cols()));
      pack(b, b.rows(), b.cols(), panels);
      kept.panels_ = panels;
    }
    return kept;
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
  /// dst = a·b for a kept b.
  template <class D, class A>
  void assign(D&& dst, const A& a, const Kept& b) const {
    run_kept<false>(std::forward<D>(dst), a, b);
  }
  /// dst += a·b for a kept b.
  template <class D, class A>
  void add(D&& dst, const A& a, const Kept& b) const {
    run_kept<true>(std::forward<D>(dst), a, b);
  }

 private:
  template <class X>
  static constexpr bool direct = (Eigen::internal::traits<X>::Flags & Eigen::DirectAccessBit) != 0;
  // The micro-kernel's path: float, a read in place, dst row-major.
  template <class D, class A>
  static constexpr bool fast = packed &&
                               (std::decay_t<D>::Flags & Eigen::RowMajorBit) != 0 && direct<A>;

  // dst (=|+=) a·B with B already in panels.
  template <bool Accumulate, class D, class A>
  static void multiply(D& dst, const A& a, const float* panels) {
    const Index m = dst.rows(), n = dst.cols(), k = a.cols();
    if (m == 0 || n == 0) return;
    if (k == 0) {
      if (!Accumulate) dst.setZero();
      return;
    }
    eigen_assert(dst.innerStride() == 1);
    kernel::gemm(m, n, k, {a.data(), a.rowStride(), a.colStride()}, panels, kernel::panel * k,
                 dst.data(), dst.outerStride(),
                 Accumulate ? kernel::Update::add : kernel::Update::assign);
  }

  template <bool Accumulate, class D, class A>
  void run_kept(D&& dst, const A& a, const Kept& b) const {
    eigen_assert(a.cols() == b.depth_ && dst.cols() == b.cols_);
    if constexpr (fast<D, A>)
      multiply<Accumulate>(dst, a, b.panels_);
    else
      sliced_product<Accumulate>(std::forward<D>(dst), a, b.map());
  }

  template <bool Accumulate, class D, class A, class B>
  void run(D&& dst, const A& a, const B& b) const {
    if constexpr (fast<D, A> && direct<B>) {
      const Index k = a.cols(), n = dst.cols();
      eigen_assert(capacity(k, n) <= capacity_);
      if (dst.rows() > 0 && n > 0 && k > 0) pack(b, k, n, pack_);
      multiply<Accumulate>(dst, a, pack_);
    } else {
      sliced_product<Accumulate>(std::forward<D>(dst), a, b);
    }
  }

  // b (k × n) into panels at dst: B[t][c] = b(t, c).
  template <class B>
  static void pack(const B& b, Index k, Index n, float* dst) {
    if (b.colStride() == 1) {
      kernel::pack_rows(b.data(), b.rowStride(), k, n, dst);
    } else if (b.rowStride() == 1) {
      kernel::pack_transposed(b.data(), b.colStride(), n, k, dst);
    } else {
      for (Index p0 = 0; p0 < n; p0 += kernel::panel)
        for (Index t = 0; t < k; ++t)
          for (Index c = 0; c < kernel::panel; ++c)
            dst[p0 * k + t * kernel::panel + c] = p0 + c < n ? b(t, p0 + c) : 0.0f;
    }
  }

  float* pack_ = nullptr;
  Index capacity_ = 0;
};

}  // namespace effattn::detail

#pragma once
// The library's one aliasing rule (no call works in place) and the overlap test behind it.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"

namespace effattn {
namespace detail {

/// Whether two row-major views (unit inner stride) share an element. Exact for views with
/// one row stride (column blocks of one matrix side by side do not overlap); views with
/// different strides count as overlapping when their address ranges do.
template <class A, class B>
bool overlaps(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  using T = typename A::Scalar;
  static_assert(std::is_same_v<T, typename B::Scalar>);
  const auto begin = [](const auto& m) { return reinterpret_cast<std::uintptr_t>(m.data()); };
  const auto end = [&](const auto& m) {
    return begin(m) +
           sizeof(T) * static_cast<std::uintptr_t>((m.rows() - 1) * m.outerStride() + m.cols());
  };
  if (end(a) <= begin(b) || end(b) <= begin(a)) return false;
  if (a.rows() == 1 && b.rows() == 1) return true;  // both contiguous
  const Index stride = a.rows() > 1 ? a.outerStride() : b.outerStride();
  if ((a.rows() > 1 && b.rows() > 1 && a.outerStride() != b.outerStride()) || a.cols() > stride ||
      b.cols() > stride || (begin(b) - begin(a)) % sizeof(T) != 0)
    return true;
  // b's first element in a's (row, column) frame; b's rows may wrap past a row's end.
  const auto offset = static_cast<Index>(
      (static_cast<std::intptr_t>(begin(b)) - static_cast<std::intptr_t>(begin(a))) /
      static_cast<std::intptr_t>(sizeof(T)));
  Index row = offset / stride, col = offset % stride;
  if (col < 0) {
    col += stride;
    --row;
  }
  const auto hits = [&](Index r0, Index c0, Index c1) {  // rows [r0, r0 + b.rows()), cols [c0, c1)
    return r0 < a.rows() && r0 + b.rows() > 0 && c0 < a.cols() && c1 > c0;
  };
  const Index right = col + b.cols();
  return hits(row, col, std::min(right, stride)) ||
         (right > stride && hits(row + 1, 0, right - stride));
}

/// An output must not share memory with an input of the same call (the library's one
/// aliasing rule: no call works in place).
template <class Out, class In>
void require_disjoint(const char* component, const char* out_name, const Out& out,
                      const char* in_name, const In& in) {
  require(!overlaps(out, in), component, out_name,
          concat("a matrix that shares memory with '", in_name, "'"),
          concat("separate memory: no effattn call works in place (pass another matrix for '",
                 out_name, "')"));
}

}  // namespace detail
}  // namespace effattn

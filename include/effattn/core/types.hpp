#pragma once
// Matrix types, the non-owning views every kernel takes, and the shape of a batch.

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "effattn/core/error.hpp"

namespace effattn {

using Index = Eigen::Index;

/// Activations and weights: row-major, rows are tokens, columns are features.
template <class S>
using Matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A row vector (biases, per-row statistics).
template <class S>
using RowVector = Eigen::Matrix<S, 1, Eigen::Dynamic, Eigen::RowMajor>;

/// Read-only view of a row-major block: a whole matrix, a range of rows, or a head's
/// column block, all without a copy (unit inner stride, any row stride).
template <class S>
using ConstView = Eigen::Ref<const Matrix<S>, 0, Eigen::OuterStride<>>;

/// Writable twin of ConstView.
template <class S>
using View = Eigen::Ref<Matrix<S>, 0, Eigen::OuterStride<>>;

/// Masking is part of the attention block's type: a policy that cannot be causal does
/// not compile as `Causal`.
struct Bidirectional {
  static constexpr bool causal = false;
};
struct Causal {
  static constexpr bool causal = true;
};

/// The shape of a batch of sequences laid out as `[batch·seq × features]`: sequence b
/// occupies rows b·seq … b·seq + seq − 1. `lengths`, when not empty, holds one valid
/// length per sequence; tokens at or beyond it are padding and are never attended to
/// (key padding). Queries at padded positions still get an output (attending to the
/// valid keys), so callers may ignore those rows.
struct SequenceShape {
  Index batch = 1;
  Index seq = 0;
  std::vector<Index> lengths{};

  /// batch·seq; an Error when that overflows Index.
  Index tokens() const {
    Index tokens = 0;
    detail::require(!__builtin_mul_overflow(batch, seq, &tokens), "SequenceShape", "batch",
                    detail::concat(batch, " sequences of ", seq, " tokens"),
                    "a batch·seq that fits in Index");
    return tokens;
  }
  Index valid_length(Index b) const {
    return lengths.empty() ? seq : lengths[static_cast<std::size_t>(b)];
  }

  /// Checks the shape against a matrix with `rows` rows; `component` and `argument`
  /// name the caller in the error message.
  void validate(const char* component, const char* argument, Index rows) const {
    detail::require(batch > 0, component, concat_arg(argument, ".batch"), batch,
                    "at least 1 sequence");
    detail::require(seq > 0, component, concat_arg(argument, ".seq"), seq, "at least 1 token");
    Index tokens = 0;
    detail::require(!__builtin_mul_overflow(batch, seq, &tokens), component, argument,
                    detail::concat("described by batch·seq = ", batch, "·", seq,
                                   ", which overflows a signed 64-bit row count"),
                    "a shape whose batch·seq fits in Index");
    detail::require(rows == tokens, component, argument,
                    detail::concat("a matrix of ", rows, " rows"),
                    detail::concat("batch·seq = ", batch, "·", seq, " = ", tokens, " rows"));
    if (lengths.empty()) return;
    detail::require(static_cast<Index>(lengths.size()) == batch, component,
                    concat_arg(argument, ".lengths"), detail::concat(lengths.size(), " lengths"),
                    detail::concat("one length per sequence (", batch, ")"));
    for (std::size_t b = 0; b < lengths.size(); ++b)
      detail::require(lengths[b] >= 0 && lengths[b] <= seq, component,
                      detail::concat(argument, ".lengths[", b, "]"), lengths[b],
                      detail::concat("a length in [0, ", seq, "]"));
  }

 private:
  static std::string concat_arg(const char* a, const char* b) { return detail::concat(a, b); }
};

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

#pragma once
// The matrix types and the non-owning views every kernel takes.

#include <Eigen/Core>

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

}  // namespace effattn

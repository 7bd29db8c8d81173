#pragma once
// Matrix types, the non-owning views every kernel takes, and the shape of a batch.

#include <Eigen/Core>
#include <cstddef>
#include <span>
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

  Index tokens() const { return batch * seq; }
  Index valid_length(Index b) const {
    return lengths.empty() ? seq : lengths[static_cast<std::size_t>(b)];
  }

  /// Checks the shape against a matrix with `rows` rows; `component` and `argument`
  /// name the caller in the error message.
  void validate(const char* component, const char* argument, Index rows) const {
    detail::require(batch > 0, component, concat_arg(argument, ".batch"), batch,
                    "at least 1 sequence");
    detail::require(seq > 0, component, concat_arg(argument, ".seq"), seq, "at least 1 token");
    detail::require(rows == batch * seq, component, argument,
                    detail::concat("a matrix of ", rows, " rows"),
                    detail::concat("batch·seq = ", batch, "·", seq, " = ", batch * seq, " rows"));
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

}  // namespace effattn

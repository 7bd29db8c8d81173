#pragma once
// SequenceShape: how a batch of sequences is laid out as rows, and which tokens are padding.

#include <string>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

/// The shape of a batch of sequences laid out as `[batch·seq × features]`: sequence b
/// occupies rows b·seq … b·seq + seq − 1. `lengths`, when not empty, holds one valid
/// length per sequence; tokens at or beyond it are padding. Padding is never read into a
/// valid row or a parameter gradient, whatever it holds (uninitialised memory, NaN): it is
/// never attended to, attention treats its queries, keys and values as 0 (so padded rows of
/// an output are finite but meaningless), sums over tokens (parameter gradients) skip it,
/// and the dy of padded rows is ignored.
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
  /// Calls f(first_row, rows) for each run of valid rows, in order; one call for all rows
  /// when nothing is padding (sequences with no padding are merged into one run).
  template <class F>
  void for_each_valid_run(F&& f) const {
    Index start = 0, run = 0;
    for (Index b = 0; b < batch; ++b) {
      const Index row = b * seq, valid = valid_length(b);
      if (run > 0 && start + run != row) {
        f(start, run);
        run = 0;
      }
      if (run == 0) start = row;
      run += valid;
      if (valid < seq && run > 0) {
        f(start, run);
        run = 0;
      }
    }
    if (run > 0) f(start, run);
  }
  /// Sets the padded rows of m (batch·seq rows) to 0.
  template <class M>
  void zero_padding(M&& m) const {
    for (Index b = 0; b < batch; ++b)
      if (const Index valid = valid_length(b); valid < seq)
        m.middleRows(b * seq + valid, seq - valid).setZero();
  }

  /// Checks the shape against a matrix with `rows` rows; `component` and `argument`
  /// name the caller in the error message.
  void validate(const char* component, const char* argument, Index rows) const {
    validate_shape(component, argument);
    detail::require(rows == tokens(), component, argument,
                    detail::concat("a matrix of ", rows, " rows"),
                    detail::concat("batch·seq = ", batch, "·", seq, " = ", tokens(), " rows"));
  }
  /// Checks the shape (`argument`), then that the matrix it describes (`matrix`, named in the
  /// error: a matrix of the wrong height is the matrix's mistake) has its batch·seq rows.
  void validate_rows(const char* component, const char* argument, const char* matrix,
                     Index rows) const {
    validate_shape(component, argument);
    detail::require(
        rows == tokens(), component, matrix, detail::concat("a matrix of ", rows, " rows"),
        detail::concat(argument, "'s batch·seq = ", batch, "·", seq, " = ", tokens(), " rows"));
  }
  /// Throws unless the shape is one (what validate checks but the rows of a matrix).
  void validate_shape(const char* component, const char* argument) const {
    detail::require(batch > 0, component, concat_arg(argument, ".batch"), batch,
                    "at least 1 sequence");
    detail::require(seq > 0, component, concat_arg(argument, ".seq"), seq, "at least 1 token");
    Index count = 0;
    detail::require(!__builtin_mul_overflow(batch, seq, &count), component, argument,
                    detail::concat("described by batch·seq = ", batch, "·", seq,
                                   ", which overflows a signed 64-bit row count"),
                    "a shape whose batch·seq fits in Index");
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

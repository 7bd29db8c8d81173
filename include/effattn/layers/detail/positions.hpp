#pragma once
// What the positional encodings share: adding a per-position row to every token, checks.

#include <cstddef>
#include <string_view>

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/checks.hpp"

namespace effattn::detail {

/// A positional encoding's decoder: the sequences and the tokens decoded per sequence so far.
struct PositionsDecoder {
  Index batch = 0;
  Index length = 0;
  std::size_t bytes() const { return 0; }
};

/// What every positional encoding is: a Layer that is not position-wise (row t's output
/// depends on t), keeps nothing for backward, files its parameters under "positions", and
/// numbers positions from `offset`.
template <class S>
struct PositionalEncoding {
  using Scalar = S;
  static constexpr bool position_wise = false;
  static constexpr std::string_view parameter_group = "positions";
  /// The position of each sequence's first token (0 unless decoding a continuation).
  Index offset = 0;
  void set_training(bool) {}
  void release_activations() {}
  std::size_t activation_bytes() const { return 0; }

  /// Incremental decoding: the tokens decoded per sequence so far, so that the next ones get
  /// positions offset + length, offset + length + 1, …
  using Decoder = PositionsDecoder;
  Decoder start_decoding(Index batch) const {
    require(batch > 0, "start_decoding", "batch", batch, "at least 1 sequence");
    return {batch, 0};
  }
};

/// What a positional encoding's decode rejects: a decoder not from start_decoding, rows that
/// are not m ≥ 1 tokens per sequence, positions at or past max_positions (0: no bound).
inline void check_decode_positions(const char* who, Index rows, Index offset, Index max_positions,
                                   const PositionsDecoder& decoder) {
  require(decoder.batch > 0, who, "decoder", "not made by start_decoding",
          "a decoder from start_decoding");
  require(rows > 0 && rows % decoder.batch == 0, who, "x", concat("a matrix of ", rows, " rows"),
          concat("m ≥ 1 new tokens for each of the ", decoder.batch, " sequences"));
  const Index m = rows / decoder.batch, first = offset + decoder.length;
  require(max_positions == 0 || first + m <= max_positions, who, "x",
          concat(m, " tokens per sequence from position ", first),
          concat("positions below ", max_positions, ", the encoding's max_positions"));
}

/// A positional encoding's decode: x holds the next m tokens of each of the decoder's
/// sequences (sequence b at rows b·m …); their positions continue from the decoder's length.
/// A rejected call changes neither the layer nor the decoder.
template <class P, class S = typename P::Scalar>
void decode_positions(P& layer, ConstView<S> x, View<S> y, typename P::Decoder& decoder) {
  layer.check_decode(x.rows(), decoder);
  const Index first = layer.offset;
  layer.offset = first + decoder.length;
  try {
    layer.forward(x, y, SequenceShape{decoder.batch, x.rows() / decoder.batch, {}});
  } catch (...) {
    layer.offset = first;
    throw;
  }
  layer.offset = first;
  decoder.length += x.rows() / decoder.batch;
}

/// The checks of a positional encoding's forward: x and y [tokens × d], positions
/// offset … offset + seq − 1 all below `max_positions` (0: no bound).
template <class X, class Y>
void require_positions(const char* who, const X& x, const Y& y, Index d, const SequenceShape& shape,
                       Index offset, Index max_positions) {
  require_call(who, x, d, "y", y, d, shape);
  require(offset >= 0, who, "offset", offset, "a position ≥ 0");
  require(max_positions == 0 || offset + shape.seq <= max_positions, who, "shape.seq",
          concat(shape.seq, " tokens from position ", offset),
          concat("positions below ", max_positions, ", the encoding's max_positions"));
}

/// y = x + row(p) for each token, p = offset + its position in its sequence; `row(p, out)`
/// writes position p's encoding into out.
template <class S, class Row>
void add_positions(ConstView<S> x, View<S> y, const SequenceShape& shape, Index offset, Row&& row) {
  for (Index b = 0; b < shape.batch; ++b)
    for (Index t = 0; t < shape.seq; ++t) {
      const Index r = b * shape.seq + t;
      auto out = y.row(r);
      row(offset + t, out);
      out += x.row(r);
    }
}

}  // namespace effattn::detail

#pragma once
// What incremental decoding through a model needs of each layer: its decoder type, how to
// start one, and one step; position-wise layers need no state and simply run forward.

#include <concepts>
#include <cstddef>

#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

/// The decoder of a layer that needs no state to decode (a position-wise layer).
struct NoDecodeState {
  std::size_t bytes() const { return 0; }
};

namespace detail {

/// A layer that decodes with state of its own: `Decoder`, start_decoding(batch) const and
/// decode(x, y, decoder) (MultiHeadAttention, positional encodings, stacks and wrappers).
template <class L>
concept HasDecoder = requires {
  typename L::Decoder;
};

template <class L>
struct DecoderOfT {
  using type = NoDecodeState;
};
template <HasDecoder L>
struct DecoderOfT<L> {
  using type = typename L::Decoder;
};
/// L's decoder type: L::Decoder, or NoDecodeState.
template <class L>
using DecoderOf = typename DecoderOfT<L>::type;

/// A decoder for `batch` sequences of layer l.
template <class L>
DecoderOf<L> start_decoding(const L& l, Index batch) {
  if constexpr (HasDecoder<L>)
    return l.start_decoding(batch);
  else {
    static_assert(L::position_wise,
                  "effattn: this layer mixes positions and has no decoder (start_decoding, "
                  "decode), so a model holding it cannot decode incrementally.");
    require(batch > 0, "start_decoding", "batch", batch, "at least 1 sequence");
    return {};
  }
}

/// Decoding runs position-wise layers' forward, which must not replace what a training
/// forward kept for backward: a layer (or stack) in training mode refuses.
template <class L>
void require_not_training(const L& l, const char* who) {
  if constexpr (requires { l.training(); })
    require(!l.training(), who, "decode", "called in training mode",
            "set_training(false) before decoding (decoding would replace the activations kept "
            "for backward)");
}

/// Throws if layer l would reject decoding `rows` new tokens with `decoder` (a decoder another
/// block made, a layer in training mode, positions past the end); changes nothing. Stacks and
/// wrappers run every block's check before any decoder moves.
template <class L, class D>
void check_decode(const L& l, Index rows, const D& decoder) {
  if constexpr (requires { l.check_decode(rows, decoder); })
    l.check_decode(rows, decoder);
  else
    require_not_training(l, "decode");
}

/// The next tokens of every sequence through layer l: x [batch·m × d_in] (sequence b at rows
/// b·m …) into y [batch·m × d_out].
template <class L, class D>
void decode(L& l, ConstView<typename L::Scalar> x, View<typename L::Scalar> y, D& decoder) {
  if constexpr (HasDecoder<L>)
    l.decode(x, y, decoder);
  else {
    require_not_training(l, "decode");
    l.forward(x, y, SequenceShape{1, x.rows(), {}});
  }
}

}  // namespace detail
}  // namespace effattn

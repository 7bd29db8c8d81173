#pragma once
// Bidirectional and Causal: the masking of an attention block, part of its type.

#include <type_traits>

namespace effattn {

/// Masking is part of the attention block's type: a policy that cannot be causal does
/// not compile as `Causal`.
struct Bidirectional {
  static constexpr bool causal = false;
};
struct Causal {
  static constexpr bool causal = true;
};

namespace detail {
/// True, or a compile error that says what a masking argument must be.
template <class Masking>
constexpr bool assert_masking() {
  static_assert(std::is_same_v<Masking, Bidirectional> || std::is_same_v<Masking, Causal>,
                "effattn: the masking argument must be effattn::Bidirectional or "
                "effattn::Causal.");
  return true;
}
}  // namespace detail

}  // namespace effattn

#pragma once
// Bidirectional and Causal: the masking of an attention block, part of its type.

namespace effattn {

/// Masking is part of the attention block's type: a policy that cannot be causal does
/// not compile as `Causal`.
struct Bidirectional {
  static constexpr bool causal = false;
};
struct Causal {
  static constexpr bool causal = true;
};

}  // namespace effattn

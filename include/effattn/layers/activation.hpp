#pragma once
// Activation: the element-wise function of a feed-forward layer's hidden units.

namespace effattn {

/// relu: max(0, x). gelu: GELU in its tanh form, 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
/// (as GPT-2 and BERT use; within 1e-3 of the erf form, and vectorised).
enum class Activation { relu, gelu };

}  // namespace effattn

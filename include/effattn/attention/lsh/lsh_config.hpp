#pragma once
// LSHConfig: the settings of Reformer's LSH attention (LSHAttention<S>::Config).

#include <optional>

#include "effattn/core/types.hpp"

namespace effattn {

/// Settings of LSHAttention (see attention/lsh.hpp for what each does).
struct LSHConfig {
  Index chunk = 64;               ///< tokens per chunk (c)
  Index rounds = 4;               ///< hash rounds (r)
  Index buckets = 0;              ///< even bucket count; 0: about 2n/c per call
  Index look_back = 1;            ///< chunks before a query's own that it sees
  Index look_forward = 0;         ///< chunks after it that it sees
  bool same_bucket = false;       ///< also mask keys of other buckets (the paper's formulation)
  bool dedup = false;             ///< subtract log(rounds in which a pair may attend) from logits
  std::optional<double> scale{};  ///< logit scale; default 1/√d_k (trax, Hugging Face)

  /// Most keys a query chunk sees in a sequence of n tokens.
  Index window(Index n) const {
    const Index w = (look_back + 1 + look_forward) * chunk;
    return w < n ? w : n;
  }
};

}  // namespace effattn

// Must not compile: a policy that cannot be causal, asked to be causal.
#include <effattn/effattn.hpp>

// A policy exactly like FullAttention except that it declares it cannot be causal
// (as a Linformer-style projection along the sequence cannot).
struct BidirectionalOnly : effattn::FullAttention<float> {
  using FullAttention::FullAttention;
  static constexpr bool supports_causal = false;
};

#ifdef EFFATTN_CONTROL
using Masking = effattn::Bidirectional;
#else
using Masking = effattn::Causal;
#endif

int main() {
  effattn::MultiHeadAttention<BidirectionalOnly, Masking> block({.d_model = 8, .heads = 2});
  return block.heads() == 2 ? 0 : 1;
}

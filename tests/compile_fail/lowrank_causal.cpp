// Must not compile: Linformer (LowRank) asked to be causal.
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Masking = effattn::Bidirectional;
#else
using Masking = effattn::Causal;
#endif

int main() {
  effattn::MultiHeadAttention<effattn::LowRank<float>, Masking> block(
      {.d_model = 8, .heads = 2, .policy = {.projection = {.k = 4, .n_max = 16}}});
  return block.heads() == 2 ? 0 : 1;
}

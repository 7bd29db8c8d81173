// Must not compile: a policy that cannot attend within a window (Favor), given a window.
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Masking = effattn::Causal;
#else
using Masking = effattn::CausalWindow<256>;
#endif

int main() {
  effattn::MultiHeadAttention<effattn::Favor<float>, Masking> block({.d_model = 8, .heads = 2});
  return block.heads() == 2 ? 0 : 1;
}

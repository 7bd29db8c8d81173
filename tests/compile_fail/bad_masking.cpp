// Must not compile: the masking argument is neither Bidirectional nor Causal.
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Masking = effattn::Causal;
#else
struct Masking {
  static constexpr bool causal = true;
};
#endif

int main() {
  effattn::MultiHeadAttention<effattn::FullAttention<float>, Masking> block(
      {.d_model = 8, .heads = 2});
  return block.heads() == 2 ? 0 : 1;
}

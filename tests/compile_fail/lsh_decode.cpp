// Must not compile: incremental decoding with LSH attention (a prefix is hashed and chunked
// differently from the whole sequence, so decoding cannot reproduce the causal forward).
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Policy = effattn::FullAttention<float>;
#else
using Policy = effattn::LSHAttention<float>;
#endif

int main() {
  effattn::MultiHeadAttention<Policy, effattn::Causal> block({.d_model = 8, .heads = 2});
  auto decoder = block.start_decoding(1);
  return decoder.batch == 1 ? 0 : 1;
}

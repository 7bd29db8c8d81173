// Must not compile: a type that is not an attention policy used as one.
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Policy = effattn::FullAttention<float>;
#else
struct Policy {};
#endif

int main() {
  effattn::MultiHeadAttention<Policy> block({.d_model = 8, .heads = 2});
  return block.heads() == 2 ? 0 : 1;
}

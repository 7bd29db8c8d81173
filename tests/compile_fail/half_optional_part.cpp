// Must not compile: a policy that begins an optional part (forward_blocks: its forward runs in
// blocks) without the rest of it (forward_block); the message names the part and its members.
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Policy = effattn::FullAttention<float>;
#else
struct Policy : effattn::FullAttention<float> {
  using effattn::FullAttention<float>::FullAttention;
  effattn::Index forward_blocks(effattn::Index, effattn::Index, effattn::Index, effattn::Index,
                                bool, effattn::Index) const {
    return 1;
  }
};
#endif

int main() {
  effattn::MultiHeadAttention<Policy> block({.d_model = 8, .heads = 2});
  return block.heads() == 2 ? 0 : 1;
}

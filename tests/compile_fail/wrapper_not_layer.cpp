// Must not compile: an attention policy (not a layer) inside PreNorm.
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Inner = effattn::MultiHeadAttention<effattn::FullAttention<float>>;
#else
using Inner = effattn::FullAttention<float>;
#endif

int main() {
  effattn::PreNorm<Inner> layer({});
  return layer.d_in() > 0 ? 0 : 1;
}

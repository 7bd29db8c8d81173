// Must not compile: PreNorm around a norm, whose parameters would be named like PreNorm's own.
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Inner = effattn::FeedForward<float>;
#else
using Inner = effattn::LayerNorm<float>;
#endif

int main() {
  effattn::PreNorm<Inner> layer({.layer = {.d_model = 8}});
  return layer.d_in() == 8 ? 0 : 1;
}

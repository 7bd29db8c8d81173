// Must not compile: Chunked around attention, which mixes positions.
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Inner = effattn::FeedForward<float>;
#else
using Inner = effattn::MultiHeadAttention<effattn::FullAttention<float> >;
#endif

int main() {
  effattn::Chunked<Inner> layer({.layer = {.d_model = 8}, .chunk = 4});
  return layer.d_in() == 8 ? 0 : 1;
}

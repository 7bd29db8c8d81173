// Must not compile: Reversible over a type that is not a layer.
#include <vector>

#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using G = effattn::FeedForward<float>;
#else
using G = std::vector<float>;
#endif

int main() {
  effattn::Reversible<effattn::FeedForward<float>, G>* block = nullptr;
  return sizeof(*block) > 0 ? 0 : 1;
}

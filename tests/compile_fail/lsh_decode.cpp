// Must not compile: incremental decoding with LSH attention (a prefix is hashed and chunked
// differently from the whole sequence, so decoding cannot reproduce the causal forward), here
// through a whole model, whose stacks and wrappers pass the decoder down to the attention.
#include <effattn/effattn.hpp>

#ifdef EFFATTN_CONTROL
using Policy = effattn::FullAttention<float>;
#else
using Policy = effattn::LSHAttention<float>;
#endif

using Attention = effattn::MultiHeadAttention<Policy, effattn::Causal>;
using Model =
    effattn::Sequential<effattn::SinusoidalPositions<float>,
                        effattn::Residual<effattn::PreNorm<Attention>>, effattn::LayerNorm<float>>;

int main() {
  Model model({.d_model = 8}, {.layer = {.layer = {.d_model = 8, .heads = 2}}}, {.d_model = 8});
  auto decoder = model.start_decoding(1);
  return std::get<1>(decoder).batch == 1 ? 0 : 1;
}

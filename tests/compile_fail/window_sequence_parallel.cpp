// Must not compile: sequence parallelism over a windowed block (not supported yet).
#include <effattn/effattn.hpp>
#include <effattn/mpi/sequence_parallel.hpp>

#ifdef EFFATTN_CONTROL
using Masking = effattn::Causal;
#else
using Masking = effattn::CausalWindow<256>;
#endif

int main() {
  using Block =
      effattn::MultiHeadAttention<effattn::mpi::SequenceParallel<effattn::FullAttention<float>>,
                                  Masking>;
  return sizeof(Block) > 0 ? 0 : 1;
}

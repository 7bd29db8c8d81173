// RingAttention under mpirun: each rank's rows of the outputs and gradients equal those of
// AttentionCore<FullAttention> run on the whole sequences in one process, for uneven and
// load-balanced shards, key padding across shard boundaries, both maskings, double and float.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "effattn/effattn.hpp"
#include "effattn/mpi/ring_attention.hpp"
#include "mpi/mpi_testing.hpp"
#include "reference.hpp"

using namespace effattn;
using namespace mpi_testing;

namespace {

template <class S>
struct Ring {
  template <class Masking>
  using type = mpi::RingAttention<S, Masking>;
};

template <class S, class Masking>
void check_ring(const mpi::SequenceShards& shards, const SequenceShape& shape, double tol) {
  const mpi::Communicator comm;
  const HeadLayout layout{.heads = 2, .d_key = 8, .d_value = 6};
  const Index h = layout.heads, dk = layout.d_key, dv = layout.d_value;
  const int rank = comm.rank();
  const std::size_t bytes = check_against_whole<Ring<S>::template type, FullAttention<S>, Masking>(
      {}, layout, shards, shape, tol);
  // Forward sends every block but the last one it holds: (P − 1) blocks of k and v; backward
  // P blocks of k, v and their gradients.
  std::int64_t sent = std::int64_t(bytes), expected = 0;
  const int ranks = comm.size();
  for (int step = 0; step + 1 < ranks; ++step)
    expected += shape.batch * shards.local_length((rank - step + ranks) % ranks) * h * (dk + dv);
  for (int step = 0; ranks > 1 && step < ranks; ++step)
    expected +=
        shape.batch * shards.local_length((rank - step + ranks) % ranks) * 2 * h * (dk + dv);
  CHECK(sent == expected * std::int64_t(sizeof(S)));
}

}  // namespace

TEST_CASE("Ring attention equals one process: uneven contiguous shards", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 3 + 2 * comm.rank());
  const Index n = shards.total();
  const SequenceShape padded{2, n, {n, n - std::min<Index>(4, n - 1)}};  // keys padded at the end
  check_ring<double, Bidirectional>(shards, padded, 1e-12);
  check_ring<double, Causal>(shards, padded, 1e-12);
  check_ring<double, Causal>(shards, SequenceShape{3, n, {}}, 1e-12);
}

TEST_CASE("Ring attention equals one process: load-balanced causal shards", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::balanced(comm.size(), 7 * comm.size() + 3);
  const Index n = shards.total();
  check_ring<double, Causal>(shards, SequenceShape{2, n, {n - 2, 1}}, 1e-12);
  check_ring<double, Bidirectional>(shards, SequenceShape{2, n, {}}, 1e-12);
  // float: the packed kernels, and segments longer than one tile
  const auto long_shards = mpi::SequenceShards::balanced(comm.size(), 260 * comm.size() + 5);
  const Index m = long_shards.total();
  check_ring<float, Causal>(long_shards, SequenceShape{2, m, {m, m - 100}}, 2e-5);
  check_ring<float, Bidirectional>(long_shards, SequenceShape{1, m, {}}, 2e-5);
}

TEST_CASE("Ring attention: a call rejected on one rank throws on every rank", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 4);
  const HeadLayout layout{.heads = 1, .d_key = 4, .d_value = 4};
  const FullAttention<double> policy({}, layout);
  mpi::RingAttention<double, Causal> ring(layout, comm, shards);
  const SequenceShape shape{1, 4, {}};
  // rank 0 passes one column too many
  Matrix<double> q = random<double>(4, comm.rank() == 0 ? 5 : 4, 1), k = random<double>(4, 4, 2);
  Matrix<double> v = random<double>(4, 4, 3), out(4, 4);
  CHECK_THROWS_AS(ring.forward(policy, q, k, v, out, shape, true), Error);
  CHECK(ring.bytes_sent() == 0);
  // backward without a forward that kept its state
  Matrix<double> good = random<double>(4, 4, 4), g(4, 4), dq(4, 4), dk(4, 4), dv(4, 4);
  CHECK_THROWS_AS(ring.backward(policy, good, k, v, out, g, dq, dk, dv, shape), Error);
  // the rows per sequence must be this rank's
  CHECK_THROWS_AS(ring.forward(policy, good, k, v, out, SequenceShape{1, 5, {}}, true), Error);
  // padding only at the end of the whole sequence: 3 valid rows on every rank is a gap
  // unless there is one rank
  const SequenceShape gaps{1, 4, {3}};
  if (comm.size() > 1)
    CHECK_THROWS_AS(ring.forward(policy, good, k, v, out, gaps, true), Error);
  else
    CHECK_NOTHROW(ring.forward(policy, good, k, v, out, gaps, true));
  CHECK_THROWS_AS(mpi::SequenceShards({{mpi::Segment{0, 3}}, {mpi::Segment{2, 3}}}), Error);
  CHECK_THROWS_AS(mpi::SequenceShards::balanced(comm.size(), 2 * comm.size() - 1), Error);
}

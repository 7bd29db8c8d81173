// ShardedFavor under mpirun: each rank's rows of the outputs and gradients equal those of
// AttentionCore<Favor> run on the whole sequences in one process (the same random features),
// for uneven shards, padding across shard boundaries and whole ranks of padding, both
// maskings, both feature maps, double and float.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "effattn/effattn.hpp"
#include "effattn/mpi/sharded_favor.hpp"
#include "mpi/mpi_testing.hpp"

using namespace effattn;
using namespace mpi_testing;

namespace {

template <class S, class Map = PositiveSoftmaxFeatures>
struct Sharded {
  template <class Masking>
  using type = mpi::ShardedFavor<S, Map, Masking>;
};

template <class S, class Masking, class Map = PositiveSoftmaxFeatures>
std::size_t check_favor(const mpi::SequenceShards& shards, const SequenceShape& shape,
                        typename Favor<S, Map>::Config config, double tol) {
  const HeadLayout layout{.heads = 2, .d_key = 8, .d_value = 6, .seed = 5};
  return check_against_whole<Sharded<S, Map>::template type, Favor<S, Map>, Masking>(
      config, layout, shards, shape, tol);
}

}  // namespace

TEST_CASE("Sharded FAVOR+ equals one process: uneven shards, padding", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 5 + 3 * comm.rank());
  const Index n = shards.total();
  // padding inside one shard; padding over whole shards (the last rank's, and all but one
  // position); no valid position at all
  for (const SequenceShape& shape : {SequenceShape{2, n, {n, n - std::min<Index>(4, n - 1)}},
                                     SequenceShape{3, n, {1, 5, n}}, SequenceShape{1, n, {0}}}) {
    // chunks of 4: several chunks per shard, and chunk boundaries off the shard boundaries
    const Favor<double>::Config small{.features = 16, .chunk = 4};
    check_favor<double, Bidirectional>(shards, shape, small, 1e-12);
    check_favor<double, Causal>(shards, shape, small, 1e-12);
    check_favor<double, Causal, ReluFeatures>(shards, shape, {.features = 12, .chunk = 3}, 1e-12);
    check_favor<double, Bidirectional, ReluFeatures>(shards, shape, {.features = 12}, 1e-12);
  }
  // per-head directions, the default chunks, ε
  const SequenceShape shape{2, n, {n - 1, n}};
  const Favor<double>::Config per_head{.features = 20, .per_head = true, .epsilon = 1e-3};
  check_favor<double, Bidirectional>(shards, shape, per_head, 1e-12);
  check_favor<double, Causal>(shards, shape, per_head, 1e-12);
}

TEST_CASE("Sharded FAVOR+ equals one process: float, long shards", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 150 + 40 * comm.rank());
  const Index n = shards.total();
  const SequenceShape shape{2, n, {n, n - 70}};
  check_favor<float, Causal>(shards, shape, {.features = 64}, 2e-4);
  check_favor<float, Bidirectional>(shards, shape, {.features = 64}, 2e-4);
}

TEST_CASE("Sharded FAVOR+ sends what its reductions need", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 6);
  const Index n = shards.total(), batch = 2, heads = 2, f = 16, dv = 6;
  const std::int64_t problems = batch * heads, ranks = comm.size();
  // bidirectional: forward and backward each reduce the shifts and the key sums; backward
  // also the queries' sums
  const std::int64_t sums = f * dv + f + dv + 1, gradient_sums = f * dv + f + 1;
  const std::size_t bi =
      check_favor<double, Bidirectional>(shards, {batch, n, {}}, {.features = f}, 1e-12);
  CHECK(std::int64_t(bi) ==
        problems * (2 * (1 + sums) + gradient_sums) * std::int64_t(sizeof(double)));
  // causal: a scan sends the records once per round, ⌈log₂ P⌉ rounds (fewer on ranks without
  // a partner in some round); forward one scan, backward two
  const std::size_t causal =
      check_favor<double, Causal>(shards, {batch, n, {}}, {.features = f}, 1e-12);
  std::int64_t rounds = 0;
  for (std::int64_t mask = 1; mask < ranks; mask <<= 1)
    rounds += (comm.rank() ^ mask) < ranks;
  std::int64_t reverse_rounds = 0;
  for (std::int64_t mask = 1; mask < ranks; mask <<= 1)
    reverse_rounds += ((ranks - 1 - comm.rank()) ^ mask) < ranks;
  CHECK(std::int64_t(causal) ==
        problems * gradient_sums * (2 * rounds + reverse_rounds) * std::int64_t(sizeof(double)));
}

TEST_CASE("Sharded FAVOR+: rejected calls throw on every rank", "[mpi]") {
  const mpi::Communicator comm;
  const HeadLayout layout{.heads = 1, .d_key = 4, .d_value = 4};
  // causal needs shards in rank order
  using CausalFavor = mpi::ShardedFavor<double, PositiveSoftmaxFeatures, Causal>;
  if (comm.size() > 1)
    CHECK_THROWS_AS(
        CausalFavor(layout, comm, mpi::SequenceShards::balanced(comm.size(), 4 * comm.size())),
        Error);
  const auto shards = mpi::SequenceShards::contiguous(comm, 4);
  const Favor<double> favor({.features = 8}, layout);
  CausalFavor sharded(layout, comm, shards);
  const SequenceShape shape{1, 4, {}};
  Matrix<double> q = random<double>(4, comm.rank() == 0 ? 5 : 4, 1), k = random<double>(4, 4, 2);
  Matrix<double> v = random<double>(4, 4, 3), out(4, 4);
  CHECK_THROWS_AS(sharded.forward(favor, q, k, v, out, shape, true), Error);
  CHECK(sharded.bytes_sent() == 0);
  Matrix<double> good = random<double>(4, 4, 4), g(4, 4), dq(4, 4), dk(4, 4), dv(4, 4);
  CHECK_THROWS_AS(sharded.backward(favor, good, k, v, out, g, dq, dk, dv, shape), Error);
  // directions for another head width
  const Favor<double> other({.features = 8}, HeadLayout{.heads = 1, .d_key = 3, .d_value = 4});
  CHECK_THROWS_AS(sharded.forward(other, good, k, v, out, shape, true), Error);
  CHECK_NOTHROW(sharded.forward(favor, good, k, v, out, shape, true));
}

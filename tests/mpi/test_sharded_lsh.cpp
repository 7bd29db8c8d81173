// ShardedLSH under mpirun: each rank's rows of the outputs and gradients equal those of
// AttentionCore<LSHAttention> on the whole sequences in one process (the same rotations, so
// the same buckets and chunks), for uneven and two-segment shards, padding, both maskings and
// the options that change which keys a query sees (look-back and look-forward, same_bucket,
// dedup, one bucket).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "effattn/effattn.hpp"
#include "effattn/mpi/sharded_lsh.hpp"
#include "mpi/mpi_testing.hpp"

using namespace effattn;
using namespace mpi_testing;

namespace {

template <class S>
struct Sharded {
  template <class Masking>
  using type = mpi::ShardedLSH<S, Masking>;
};

template <class S, class Masking>
std::size_t check_lsh(const mpi::SequenceShards& shards, const SequenceShape& shape,
                      const LSHConfig& config, double tol) {
  const HeadLayout layout{.heads = 2, .d_key = 6, .d_value = 5, .seed = 11};
  return check_against_whole<Sharded<S>::template type, LSHAttention<S>, Masking>(
      config, layout, shards, shape, tol);
}

}  // namespace

TEST_CASE("Sharded LSH equals one process: shards, padding, masking, options", "[mpi]") {
  const mpi::Communicator comm;
  const auto uneven = mpi::SequenceShards::contiguous(comm, 6 + 5 * comm.rank());
  const auto two_segments = mpi::SequenceShards::balanced(comm.size(), 13 * comm.size() + 3);
  // ranks in reverse position order: rank 0 holds the end of the sequence
  std::vector<std::vector<mpi::Segment>> backwards(std::size_t(comm.size()));
  for (int r = 0, offset = 0; r < comm.size(); ++r) {
    const int length = 4 + 3 * (comm.size() - 1 - r);
    backwards[std::size_t(comm.size() - 1 - r)] = {{offset, length}};
    offset += length;
  }
  const LSHConfig configs[] = {
      {.chunk = 4, .rounds = 2},                                     // buckets ≈ 2n/c
      {.chunk = 3, .rounds = 3, .buckets = 4, .look_forward = 1},    // windows both ways
      {.chunk = 2, .rounds = 2, .buckets = 6, .same_bucket = true},  // only the own bucket
      {.chunk = 3, .rounds = 3, .buckets = 4, .look_back = 2, .dedup = true},
      {.chunk = 5, .rounds = 1, .buckets = 1, .look_back = 0},  // no hashing: plain chunks
  };
  for (const auto& shards : {uneven, two_segments, mpi::SequenceShards(backwards)}) {
    const Index n = shards.total();
    for (const SequenceShape& shape :
         {SequenceShape{2, n, {n, n - std::min<Index>(7, n - 1)}}, SequenceShape{3, n, {1, 4, 0}}})
      for (const LSHConfig& config : configs) {
        CAPTURE(config.chunk, config.rounds, config.buckets, config.dedup);
        check_lsh<double, Bidirectional>(shards, shape, config, 1e-12);
        check_lsh<double, Causal>(shards, shape, config, 1e-12);
      }
  }
}

TEST_CASE("Sharded LSH equals one process: float, longer shards; what it sends", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 120 + 30 * comm.rank());
  const Index n = shards.total();
  const SequenceShape shape{1, n, {n - 9}};
  const LSHConfig config{.chunk = 16, .rounds = 2};
  check_lsh<float, Causal>(shards, shape, config, 2e-5);
  const std::size_t sent = check_lsh<float, Bidirectional>(shards, shape, config, 2e-5);
  // One process sends nothing; more send at least the bucket ids of their rows.
  if (comm.size() == 1)
    CHECK(sent == 0);
  else
    CHECK(sent >= sizeof(std::int32_t) * std::size_t(2 * 2 * shards.local_length(comm.rank())));
}

TEST_CASE("Sharded LSH rejects a bad call on every rank, before any data moves", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 4);
  const HeadLayout layout{.heads = 1, .d_key = 4, .d_value = 4};
  LSHAttention<double> policy({.chunk = 2, .rounds = 2}, layout);
  mpi::ShardedLSH<double> sharded(layout, comm, shards);
  const Matrix<double> x = random<double>(4, 4, 1);
  Matrix<double> out(4, 4), wrong(3, 4);
  // only rank 0 passes a wrong output: every rank throws
  CHECK_THROWS_AS(
      sharded.forward(policy, x, x, x, comm.rank() == 0 ? View<double>(wrong) : View<double>(out),
                      {1, 4}, true),
      Error);
  CHECK_FALSE(sharded.kept_for({1, 4}));
  // backward without a forward that kept its state
  Matrix<double> g(4, 4), dq(4, 4), dk(4, 4), dv(4, 4);
  CHECK_THROWS_AS(sharded.backward(policy, x, x, x, out, g, dq, dk, dv, {1, 4}), Error);
  sharded.forward(policy, x, x, x, out, {1, 4}, true);
  CHECK(sharded.kept_for({1, 4}));
  CHECK(sharded.saved_bytes() > 0);
  CHECK(out.allFinite());
}

TEST_CASE("Sharded LSH sends the keys once when they are the queries (shared QK)", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 24 + comm.rank());
  const Index n_r = shards.local_length(comm.rank());
  const HeadLayout layout{.heads = 2, .d_key = 6, .d_value = 4, .seed = 3};
  LSHAttention<double> policy({.chunk = 4, .rounds = 2}, layout);
  const Matrix<double> x = random<double>(n_r, 12, 1 + std::uint64_t(comm.rank()));
  const Matrix<double> x_copy = x, v = random<double>(n_r, 8, 9 + std::uint64_t(comm.rank()));
  Matrix<double> shared_out(n_r, 8), copy_out(n_r, 8);
  mpi::ShardedLSH<double, Causal> shared(layout, comm, shards), copied(layout, comm, shards);
  shared.forward(policy, x, x, v, shared_out, {1, n_r}, false);
  copied.forward(policy, x, x_copy, v, copy_out, {1, n_r}, false);
  CHECK(shared_out == copy_out);
  if (comm.size() > 1)
    CHECK(shared.bytes_sent() < copied.bytes_sent());
  else
    CHECK(shared.bytes_sent() == copied.bytes_sent());
}

// ShardedLowRank under mpirun: each rank's rows of the outputs and gradients, and after a sum
// over the ranks the projections' gradients, equal those of AttentionCore<LowRank> on the
// whole sequences in one process, for uneven and two-segment shards and padding.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "effattn/effattn.hpp"
#include "effattn/mpi/sharded_low_rank.hpp"
#include "mpi/mpi_testing.hpp"

using namespace effattn;
using namespace mpi_testing;

namespace {

using Linformer = LowRank<double, DenseProjection>;
template <class Masking>
using Sharded = mpi::ShardedLowRank<double, Masking>;

void check_low_rank(const mpi::SequenceShards& shards, const SequenceShape& shape,
                    ProjectionSharing sharing) {
  const HeadLayout layout{.heads = 2, .d_key = 8, .d_value = 6, .seed = 3};
  const Linformer::Config config{.projection = {.k = 5, .n_max = shards.total() + 3},
                                 .sharing = sharing};
  check_against_whole<Sharded, Linformer, Bidirectional>(config, layout, shards, shape, 1e-12);
}

}  // namespace

TEST_CASE("Sharded Linformer equals one process: outputs, dq, dk, dv", "[mpi]") {
  const mpi::Communicator comm;
  const auto uneven = mpi::SequenceShards::contiguous(comm, 4 + 3 * comm.rank());
  const auto two_segments = mpi::SequenceShards::balanced(comm.size(), 9 * comm.size() + 1);
  for (const auto& shards : {uneven, two_segments}) {
    const Index n = shards.total();
    for (const SequenceShape& shape :
         {SequenceShape{2, n, {n, n - std::min<Index>(5, n - 1)}}, SequenceShape{2, n, {1, 0}}})
      for (auto sharing :
           {ProjectionSharing::headwise, ProjectionSharing::none, ProjectionSharing::key_value})
        check_low_rank(shards, shape, sharing);
  }
}

TEST_CASE("Sharded Linformer: its ranks' dE add up to the whole sequence's", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 3 + comm.rank());
  const Index n = shards.total(), batch = 2;
  const HeadLayout layout{.heads = 2, .d_key = 4, .d_value = 4, .seed = 7};
  const Linformer::Config config{.projection = {.k = 3, .n_max = n + 2}};
  const SequenceShape shape{batch, n, {n, n - 2}};
  const Matrix<double> q = random<double>(batch * n, 8, 1), k = random<double>(batch * n, 8, 2),
                       v = random<double>(batch * n, 8, 3), g = random<double>(batch * n, 8, 4);
  AttentionCore<Linformer> whole(config, layout);
  Matrix<double> out(batch * n, 8), dq(batch * n, 8), dk(batch * n, 8), dv(batch * n, 8);
  whole.forward(q, k, v, out, shape, shape, true);
  whole.backward(q, k, v, out, g, dq, dk, dv, shape, shape);

  const int rank = comm.rank();
  auto mine = [&](const Matrix<double>& m) { return local_rows(m, shards, rank, batch); };
  Linformer policy(config, layout);
  mpi::ShardedLowRank<double> sharded(layout, comm, shards);
  const Matrix<double> lq = mine(q), lk = mine(k), lv = mine(v), lg = mine(g);
  Matrix<double> l_out(lq.rows(), 8), l_dq(lq.rows(), 8), l_dk(lq.rows(), 8), l_dv(lq.rows(), 8);
  const SequenceShape local = local_shape(shape, shards, rank);
  sharded.forward(policy, lq, lk, lv, l_out, local, true);
  sharded.backward(policy, lq, lk, lv, l_out, lg, l_dq, l_dk, l_dv, local);
  for (bool values : {false, true}) {
    Matrix<double> de = policy.projection(0, values).gradient();
    comm.all_reduce(de.data(), std::size_t(de.size()));
    CHECK(reference::relative_error(de, whole.policy().projection(0, values).gradient()) < 1e-12);
  }
  // one all-reduce of E·K and F·V forward, one of their gradients backward
  CHECK(sharded.bytes_sent() == std::size_t(2 * batch * layout.heads * 3 * 8) * sizeof(double));
  // projections too short for the whole sequence
  Linformer short_e({.projection = {.k = 1, .n_max = n - 1}}, layout);
  CHECK_THROWS_AS(sharded.forward(short_e, lq, lk, lv, l_out, local, true), Error);
}

#pragma once
// What the MPI tests share: this rank's rows of whole-sequence data, and its shape.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "effattn/attention/attention_core.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/mpi/communicator.hpp"
#include "effattn/mpi/sequence_shards.hpp"
#include "reference.hpp"

namespace mpi_testing {

using namespace effattn;

// This rank's rows of whole-sequence activations [batch·N × w].
template <class S>
Matrix<S> local_rows(const Matrix<S>& whole, const mpi::SequenceShards& shards, int rank,
                     Index batch) {
  const Index n = shards.total(), n_r = shards.local_length(rank);
  Matrix<S> part(batch * n_r, whole.cols());
  for (Index b = 0; b < batch; ++b) {
    Index row = 0;
    for (const mpi::Segment& s : shards.segments(rank)) {
      part.middleRows(b * n_r + row, s.length) = whole.middleRows(b * n + s.offset, s.length);
      row += s.length;
    }
  }
  return part;
}

// This rank's shape: its rows per sequence, and its valid rows when `whole` has padding.
inline SequenceShape local_shape(const SequenceShape& whole, const mpi::SequenceShards& shards,
                                 int rank) {
  SequenceShape part{whole.batch, shards.local_length(rank), {}};
  if (!whole.lengths.empty())
    for (Index b = 0; b < whole.batch; ++b) {
      Index valid = 0;
      for (const mpi::Segment& s : shards.segments(rank))
        valid += std::clamp<Index>(whole.lengths[std::size_t(b)] - s.offset, 0, s.length);
      part.lengths.push_back(valid);
    }
  return part;
}

template <class S>
Matrix<S> random(Index rows, Index cols, std::uint64_t seed) {
  Matrix<S> m(rows, cols);
  CounterRng(seed).fill_normal(m, 1.0);
  return m;
}

// Runs Engine (mpi::RingAttention, mpi::ShardedFavor: forward and backward with a policy) on
// this rank's rows and AttentionCore<Policy, Masking> on the whole sequences, with the same
// configuration, and checks that this rank's rows of the outputs and of dq, dk, dv agree to
// `tol`. Returns the bytes the engine sent.
template <template <class> class Engine, class Policy, class Masking>
std::size_t check_against_whole(const typename Policy::Config& config, const HeadLayout& layout,
                                const mpi::SequenceShards& shards, const SequenceShape& shape,
                                double tol) {
  using S = typename Policy::Scalar;
  const mpi::Communicator comm;
  const Index rows = shape.tokens(), h = layout.heads, dk = layout.d_key, dv = layout.d_value;
  const Matrix<S> q = random<S>(rows, h * dk, 1), k = random<S>(rows, h * dk, 2);
  const Matrix<S> v = random<S>(rows, h * dv, 3), d_out = random<S>(rows, h * dv, 4);

  AttentionCore<Policy, Masking> whole(config, layout);
  Matrix<S> out(rows, h * dv), dq(rows, h * dk), dk_(rows, h * dk), dv_(rows, h * dv);
  whole.forward(q, k, v, out, shape, shape, true);
  whole.backward(q, k, v, out, d_out, dq, dk_, dv_, shape, shape);

  const int rank = comm.rank();
  auto mine = [&](const Matrix<S>& m) { return local_rows(m, shards, rank, shape.batch); };
  Policy policy(config, layout);
  Engine<Masking> engine(layout, comm, shards);
  const Matrix<S> lq = mine(q), lk = mine(k), lv = mine(v), ld_out = mine(d_out);
  Matrix<S> l_out(lq.rows(), h * dv), l_dq(lq.rows(), h * dk), l_dk(lq.rows(), h * dk),
      l_dv(lq.rows(), h * dv);
  const SequenceShape mine_shape = local_shape(shape, shards, rank);
  engine.forward(policy, lq, lk, lv, l_out, mine_shape, true);
  CAPTURE(rank, comm.size(), shape.batch, shape.seq, shape.lengths);
  CHECK(reference::relative_error(l_out, mine(out)) < tol);
  engine.backward(policy, lq, lk, lv, l_out, ld_out, l_dq, l_dk, l_dv, mine_shape);
  CHECK(reference::relative_error(l_dq, mine(dq)) < tol);
  CHECK(reference::relative_error(l_dk, mine(dk_)) < tol);
  CHECK(reference::relative_error(l_dv, mine(dv_)) < tol);
  return engine.bytes_sent();
}

}  // namespace mpi_testing

// A whole model on sharded sequences: MultiHeadAttention<mpi::SequenceParallel<P>> (P =
// FullAttention, Favor, LowRank, LSHAttention) inside pre-norm residual blocks gives each rank its
// rows of the single-process model's output and input gradient, and, after all_reduce_gradients,
// its parameter gradients (b_k's is 0 up to rounding under softmax's shift invariance:
// gradient_error has an absolute floor).
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <string>

#include "effattn/effattn.hpp"
#include "effattn/mpi/all_reduce_gradients.hpp"
#include "effattn/mpi/sequence_parallel.hpp"
#include "mpi/mpi_testing.hpp"
#include "reference.hpp"

using namespace effattn;
using namespace mpi_testing;

namespace {

template <class Attention>
using Encoder = Sequential<SinusoidalPositions<double>, Residual<PreNorm<Attention>>,
                           Residual<PreNorm<FeedForward<double>>>, LayerNorm<double>>;

template <class Attention>
Encoder<Attention> encoder(Index d, typename Attention::Config attention) {
  return Encoder<Attention>({.d_model = d}, {.layer = {.layer = attention}},
                            {.layer = {.layer = {.d_model = d, .d_ff = 2 * d, .seed = 3}}},
                            {.d_model = d});
}

template <class Policy, class Masking>
void check_encoder(Index local_length, typename Policy::Config policy = {}) {
  const mpi::Communicator comm;
  const int rank = comm.rank();
  const auto shards = mpi::SequenceShards::contiguous(comm, local_length);
  const Index d = 12, batch = 2, n = shards.total(), n_r = shards.local_length(rank);
  const SequenceShape whole_shape{batch, n, {n, n - 1}};
  using Whole = MultiHeadAttention<Policy, Masking>;
  using Sharded = MultiHeadAttention<mpi::SequenceParallel<Policy>, Masking>;
  auto whole = encoder<Whole>(d, {.d_model = d, .heads = 3, .seed = 1, .policy = policy});
  auto sharded = encoder<Sharded>(
      d, {.d_model = d, .heads = 3, .seed = 1, .policy = {.policy = policy, .shards = shards}});
  // the same (random, nonzero) parameters
  std::map<std::string, Matrix<double>> values;
  std::uint64_t seed = 10;
  whole.visit_parameters([&](std::string_view name, Matrix<double>& w, auto&) {
    CounterRng(seed++).fill_normal(w, 0.5);
    values[std::string(name)] = w;
  });
  sharded.visit_parameters(
      [&](std::string_view name, Matrix<double>& w, auto&) { w = values.at(std::string(name)); });
  // positions continue from the shard's first
  sharded.template get<0>().offset = shards.segments(rank).front().offset;

  Matrix<double> x(batch * n, d), dy(batch * n, d);
  CounterRng(1).fill_normal(x, 1.0);
  CounterRng(2).fill_normal(dy, 1.0);
  Matrix<double> y(batch * n, d), dx(batch * n, d);
  whole.set_training(true);
  whole.forward(x, y, whole_shape);
  whole.backward(x, dy, dx, whole_shape);

  const SequenceShape shape = local_shape(whole_shape, shards, rank);
  const Matrix<double> lx = local_rows(x, shards, rank, batch),
                       ldy = local_rows(dy, shards, rank, batch);
  Matrix<double> ly(batch * n_r, d), ldx(batch * n_r, d);
  sharded.set_training(true);
  sharded.forward(lx, ly, shape);
  sharded.backward(lx, ldy, ldx, shape);
  mpi::all_reduce_gradients(comm, sharded);
  CAPTURE(rank, comm.size());
  CHECK(reference::relative_error(ly, local_rows(y, shards, rank, batch)) < 1e-12);
  CHECK(reference::relative_error(ldx, local_rows(dx, shards, rank, batch)) < 1e-12);
  std::map<std::string, Matrix<double>> gradients;
  whole.visit_parameters(
      [&](std::string_view name, auto&, Matrix<double>& g) { gradients[std::string(name)] = g; });
  sharded.visit_parameters([&](std::string_view name, auto&, Matrix<double>& g) {
    CAPTURE(name);
    CHECK(reference::gradient_error(g, gradients.at(std::string(name))) < 1e-11);
  });
}

}  // namespace

TEST_CASE("A sharded encoder equals the whole one: outputs and all gradients", "[mpi]") {
  const mpi::Communicator comm;
  check_encoder<FullAttention<double>, Causal>(4 + comm.rank());
  check_encoder<FullAttention<double>, Bidirectional>(5 - comm.rank() % 2);
  check_encoder<Favor<double>, Causal>(4 + comm.rank(), {.features = 12, .chunk = 3});
  check_encoder<Favor<double>, Bidirectional>(5 - comm.rank() % 2, {.features = 12});
  check_encoder<LowRank<double>, Bidirectional>(5 - comm.rank() % 2,
                                                {.projection = {.k = 4, .n_max = 5 * comm.size()}});
  check_encoder<LSHAttention<double>, Causal>(4 + comm.rank(), {.chunk = 3, .rounds = 2});
  check_encoder<LSHAttention<double>, Bidirectional>(5 - comm.rank() % 2,
                                                     {.chunk = 2, .rounds = 2, .buckets = 4});
}

TEST_CASE("A sharded Favor block is a Favor: its random features can be redrawn", "[mpi]") {
  const mpi::Communicator comm;
  const auto shards = mpi::SequenceShards::contiguous(comm, 3);
  MultiHeadAttention<mpi::SequenceParallel<Favor<double>>, Causal> block(
      {.d_model = 8, .heads = 2, .policy = {.policy = {.features = 4}, .shards = shards}});
  const Matrix<double> before = block.policy().projection(0);
  block.policy().redraw(99);
  CHECK(block.policy().projection(0).rows() == 4);
  CHECK((block.policy().projection(0) - before).norm() > 0);
}

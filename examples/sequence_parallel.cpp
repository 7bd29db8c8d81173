// A Reformer-style causal encoder block on sequences sharded over MPI ranks:
//   mpirun -np 4 examples/sequence_parallel [positions per rank]
// Every rank holds its own positions of each sequence; only the LSH attention communicates.
// The ranks train a few steps (gradients summed over the ranks, then the same step
// everywhere), and rank 0 checks the sharded forward against the same model run on the whole
// sequences in one process.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include <effattn/effattn.hpp>
#include <effattn/mpi/all_reduce_gradients.hpp>
#include <effattn/mpi/sequence_parallel.hpp>

using namespace effattn;

template <class Attention>
using Block = Sequential<SinusoidalPositions<float>, Residual<PreNorm<Attention>>,
                         Residual<PreNorm<FeedForward<float>>>>;

template <class Attention>
Block<Attention> block(Index d, typename Attention::Config attention) {
  return Block<Attention>({.d_model = d}, {.layer = {.layer = attention}},
                          {.layer = {.layer = {.d_model = d, .d_ff = 2 * d, .seed = 2}}});
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int failed = 0;
  try {
    const mpi::Communicator comm;  // MPI_COMM_WORLD
    const Index n_local = argc > 1 ? std::atol(argv[1]) : 256, d = 64, batch = 2;
    const auto shards = mpi::SequenceShards::contiguous(comm, n_local);
    const Index n = shards.total(), first = shards.segments(comm.rank()).front().offset;
    const LSHConfig lsh{.chunk = 32, .rounds = 2};

    using Sharded = MultiHeadAttention<mpi::SequenceParallel<LSHAttention<float>>, Causal>;
    auto model = block<Sharded>(
        d, {.d_model = d, .heads = 4, .seed = 1, .policy = {.policy = lsh, .shards = shards}});
    model.get<0>().offset = first;  // positions are the whole sequence's

    // The same inputs on every rank (one seed); each takes its rows.
    Matrix<float> x_all(batch * n, d), target_all(batch * n, d);
    CounterRng(7).fill_normal(x_all, 1.0);
    CounterRng(8).fill_normal(target_all, 1.0);
    Matrix<float> x(batch * n_local, d), target(batch * n_local, d);
    for (Index b = 0; b < batch; ++b) {
      x.middleRows(b * n_local, n_local) = x_all.middleRows(b * n + first, n_local);
      target.middleRows(b * n_local, n_local) = target_all.middleRows(b * n + first, n_local);
    }
    const SequenceShape shape{batch, n_local, {}};

    // A few steps of regression on the target: loss and gradients summed over the ranks.
    Matrix<float> y(x.rows(), d), dy(x.rows(), d), dx(x.rows(), d);
    Sgd<float> sgd({.lr = 0.05});
    model.set_training(true);
    for (int step = 0; step < 5; ++step) {
      model.forward(x, y, shape);
      dy = (y - target) / float(batch * n * d);
      double loss = 0.5 * double((y - target).squaredNorm()) / double(batch * n * d);
      comm.all_reduce(&loss, 1);
      model.backward(x, dy, dx, shape);
      mpi::all_reduce_gradients(comm, model);  // every rank now takes the same step
      sgd.step(model);
      model.zero_grad();
      if (comm.rank() == 0)
        std::printf("step %d: loss %.5f (%d ranks × %ld positions)\n", step, loss, comm.size(),
                    long(n_local));
    }

    // Rank 0: the whole sequences in one process, with the trained parameters, must agree.
    model.set_training(false);
    model.forward(x, y, shape);
    Matrix<float> y_all(batch * n, d);
    std::vector<float> gathered(std::size_t(batch * n * d));
    MPI_Gather(y.data(), int(y.size()), MPI_FLOAT, gathered.data(), int(y.size()), MPI_FLOAT, 0,
               MPI_COMM_WORLD);
    if (comm.rank() == 0) {
      auto whole = block<MultiHeadAttention<LSHAttention<float>, Causal>>(
          d, {.d_model = d, .heads = 4, .seed = 1, .policy = lsh});
      std::map<std::string, Matrix<float>> trained;
      model.visit_parameters(
          [&](std::string_view name, Matrix<float>& w, auto&) { trained[std::string(name)] = w; });
      whole.visit_parameters([&](std::string_view name, Matrix<float>& w, auto&) {
        w = trained.at(std::string(name));
      });
      whole.forward(x_all, y_all, {batch, n, {}});
      double worst = 0;
      for (int r = 0; r < comm.size(); ++r)  // rank r's rows of sequence b
        for (Index b = 0; b < batch; ++b)
          for (Index i = 0; i < n_local; ++i)
            for (Index j = 0; j < d; ++j) {
              const float mine = gathered[std::size_t(((r * batch + b) * n_local + i) * d + j)];
              worst = std::max(worst, double(std::abs(mine - y_all(b * n + r * n_local + i, j))));
            }
      std::printf("sharded vs one process: largest difference %.2e\n", worst);
      failed = worst > 1e-4;
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    failed = 1;
  }
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return failed;
}

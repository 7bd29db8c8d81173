// Sequence-parallel blocks misused on one rank: a call that one rank rejects, or a block built
// differently on one rank (d_model, heads, seed, feature count, LSH settings, LowRank's n_max,
// the shard table, random features redrawn on one rank), is an effattn::Error on every rank
// before any data moves, never a hang or a silent wrong answer. Run by ctest on 2 and 3 ranks
// with a short timeout ("[misconfiguration]"), so a hang fails the test.
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "effattn/effattn.hpp"
#include "effattn/mpi/sequence_parallel.hpp"
#include "mpi/mpi_testing.hpp"

using namespace effattn;
using namespace mpi_testing;

namespace {

// Runs `call` on every rank: every rank must throw an effattn::Error; returns this rank's
// message. The result is shared so that a rank that did not throw fails on every rank.
std::string error_on_every_rank(const std::function<void()>& call) {
  const mpi::Communicator comm;
  std::string message = "none";
  std::int64_t threw = 0;
  const auto start = std::chrono::steady_clock::now();
  try {
    call();
  } catch (const Error& e) {
    threw = 1;
    message = e.what();
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::int64_t all = threw;
  comm.all_reduce(&all, 1);
  CAPTURE(comm.rank(), message, seconds);
  CHECK(all == comm.size());
  return message;
}

bool odd_rank_out() {
  return mpi::Communicator().rank() == mpi::Communicator().size() - 1;
}

template <class Policy, class Masking = Bidirectional>
using Sharded = MultiHeadAttention<mpi::SequenceParallel<Policy>, Masking>;

// A sharded block's config: every rank the same unless `change` alters it on the last rank.
template <class Policy, class Masking = Bidirectional>
typename Sharded<Policy, Masking>::Config config(
    const mpi::SequenceShards& shards, typename Policy::Config policy = {},
    const std::function<void(typename Sharded<Policy, Masking>::Config&)>& change = {}) {
  typename Sharded<Policy, Masking>::Config c{
      .d_model = 16, .heads = 2, .seed = 1, .policy = {.policy = policy, .shards = shards}};
  if (change && odd_rank_out()) change(c);
  return c;
}

template <class Block>
void forward(Block& block, const mpi::SequenceShards& shards) {
  const mpi::Communicator comm;
  const Index n_r = shards.local_length(comm.rank()), d = block.d_model();
  const Matrix<double> x = random<double>(n_r, d, 5);
  Matrix<double> y(n_r, d);
  block.forward(x, y, SequenceShape{1, n_r, {}});
}

}  // namespace

TEST_CASE("A call one rank rejects throws on every rank", "[.misconfiguration]") {
  const mpi::Communicator comm;
  if (comm.size() < 2) return;
  const auto shards = mpi::SequenceShards::contiguous(comm, 32);
  const Index n_r = 32;
  using Block = Sharded<FullAttention<double>, Causal>;
  Block block(config<FullAttention<double>, Causal>(shards));
  const Matrix<double> x = random<double>(n_r, 16, 5), dy = random<double>(n_r, 16, 6);
  Matrix<double> y(n_r, 16), dx(n_r, 16);
  const SequenceShape shape{1, n_r, {}};

  SECTION("backward without a training forward on one rank") {
    block.set_training(true);
    block.forward(x, y, shape);
    if (odd_rank_out()) block.release_activations();
    const std::string message = error_on_every_rank([&] { block.backward(x, dy, dx, shape); });
    CHECK((message.find("rejected on another rank") != std::string::npos ||
           message.find("without a preceding training forward") != std::string::npos));
  }
  SECTION("a wrong row count on one rank") {
    const Matrix<double> short_x = random<double>(n_r - 1, 16, 5);
    Matrix<double> short_y(n_r - 1, 16);
    error_on_every_rank([&] {
      if (odd_rank_out())
        block.forward(short_x, short_y, SequenceShape{1, n_r - 1, {}});
      else
        block.forward(x, y, shape);
    });
  }
  SECTION("y aliasing x on one rank") {
    Matrix<double> xy = x;
    error_on_every_rank([&] {
      if (odd_rank_out())
        block.forward(xy, xy, shape);
      else
        block.forward(x, y, shape);
    });
  }
  // And afterwards the block works on every rank.
  block.set_training(false);
  block.forward(x, y, shape);
  CHECK(y.allFinite());
}

TEST_CASE("A block built differently on one rank is an Error on every rank",
          "[.misconfiguration]") {
  const mpi::Communicator comm;
  if (comm.size() < 2) return;
  const auto shards = mpi::SequenceShards::contiguous(comm, 32);
  auto expect_differs = [&](auto&& block, const char* part) {
    const std::string message = error_on_every_rank([&] { forward(block, shards); });
    CHECK(message.find(part) != std::string::npos);
    CHECK(message.find("not the same on every rank") != std::string::npos);
  };
  using Full = FullAttention<double>;
  using Performer = Favor<double>;
  using Reformer = LSHAttention<double>;
  using Linformer = LowRank<double, DenseProjection>;
  SECTION("d_model (each rank passing its own width)") {
    expect_differs(
        Sharded<Full>(config<Full>(shards, {},
                                   [](auto& c) {
                                     c.d_model = 24;
                                     c.d_head = 8;  // the same head layout: only the layer differs
                                   })),
        "layer");
  }
  SECTION("heads") {
    expect_differs(Sharded<Full>(config<Full>(shards, {}, [](auto& c) { c.heads = 4; })),
                   "head layout");
  }
  SECTION("the seed") {
    expect_differs(Sharded<Full>(config<Full>(shards, {}, [](auto& c) { c.seed = 2; })),
                   "head layout");
  }
  SECTION("the shard table") {
    // Another valid table for the same ranks: the last two ranks' blocks swapped.
    std::vector<std::vector<mpi::Segment>> per_rank;
    for (int r = 0; r < comm.size(); ++r)
      per_rank.push_back(shards.segments(r));
    std::swap(per_rank[per_rank.size() - 1], per_rank[per_rank.size() - 2]);
    const mpi::SequenceShards swapped(per_rank);
    auto c = config<Full>(shards);
    if (odd_rank_out()) c.policy.shards = swapped;
    expect_differs(Sharded<Full>(c), "head layout and shards");
  }
  SECTION("Favor's feature count") {
    expect_differs(Sharded<Performer>(config<Performer>(
                       shards, {.features = 16}, [](auto& c) { c.policy.policy.features = 32; })),
                   "policy settings");
  }
  SECTION("Favor's random features redrawn on one rank") {
    Sharded<Performer> block(config<Performer>(shards, {.features = 16}));
    if (odd_rank_out()) block.policy().redraw(99);
    expect_differs(block, "random features");
  }
  SECTION("LSH rounds, chunk and buckets") {
    const LSHConfig base{.chunk = 8, .rounds = 2, .buckets = 8};
    for (int which = 0; which < 3; ++which) {
      CAPTURE(which);
      expect_differs(Sharded<Reformer>(config<Reformer>(shards, base,
                                                        [&](auto& c) {
                                                          if (which == 0)
                                                            c.policy.policy.rounds = 3;
                                                          if (which == 1)
                                                            c.policy.policy.chunk = 16;
                                                          if (which == 2)
                                                            c.policy.policy.buckets = 4;
                                                        })),
                     "policy settings");
    }
  }
  SECTION("LSH rotations drawn from another seed on one rank") {
    Sharded<Reformer> block(config<Reformer>(shards, {.chunk = 8, .rounds = 2, .buckets = 8}));
    if (odd_rank_out()) block.policy().redraw(7);
    expect_differs(block, "random features or rotations");
  }
  SECTION("LowRank's n_max") {
    const Index n = shards.total();
    expect_differs(Sharded<Linformer>(config<Linformer>(
                       shards, {.projection = {.k = 8, .n_max = n}},
                       [&](auto& c) { c.policy.policy.projection.n_max = 2 * n; })),
                   "policy settings");
  }
}

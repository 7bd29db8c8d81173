// parallel_for: every task once, exceptions rethrown.
#include <catch2/catch.hpp>

#include <atomic>
#include <stdexcept>
#include <vector>

#include "effattn/core/parallel.hpp"

using namespace effattn;

TEST_CASE("parallel_for runs every task once and rethrows a task's exception", "[core][parallel]") {
  const int threads = max_threads();
  REQUIRE(threads >= 1);
  std::vector<std::atomic<int>> hits(1000);
  std::atomic<int> bad_slot{0};
  parallel_for(1000, threads, [&](Index i, int slot) {
    hits[static_cast<std::size_t>(i)].fetch_add(1);
    if (slot < 0 || slot >= threads) bad_slot.fetch_add(1);
  });
  for (auto& h : hits)
    CHECK(h.load() == 1);
  CHECK(bad_slot.load() == 0);
  CHECK_THROWS_AS(parallel_for(100, threads,
                               [](Index i, int) {
                                 if (i == 17) throw std::runtime_error("task 17");
                               }),
                  std::runtime_error);
  int calls = 0;
  parallel_for(0, threads, [&](Index, int) { ++calls; });
  CHECK(calls == 0);
}

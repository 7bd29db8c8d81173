// Workspace and WorkspacePool: aligned slices, frames, peak and growth accounting.
#include <catch2/catch.hpp>

#include <cstdint>

#include "effattn/core/workspace.hpp"
#include "effattn/core/workspace_pool.hpp"

using namespace effattn;

TEST_CASE("Workspace: aligned slices, frames, peak and growth accounting", "[core][workspace]") {
  Workspace ws;
  ws.reserve(1024);
  CHECK(ws.total_capacity() >= 1024);
  {
    Workspace::Frame outer(ws);
    float* a = ws.take<float>(3);
    CHECK(reinterpret_cast<std::uintptr_t>(a) % Workspace::alignment == 0);
    CHECK(ws.in_use() == 64);
    {
      Workspace::Frame inner(ws);
      auto m = ws.matrix<double>(4, 5);
      CHECK(reinterpret_cast<std::uintptr_t>(m.data()) % Workspace::alignment == 0);
      CHECK(ws.in_use() == 64 + 192);
    }
    CHECK(ws.in_use() == 64);
    CHECK(ws.peak_bytes() == 256);
  }
  CHECK(ws.in_use() == 0);
  CHECK(ws.growths() == 0);
  {
    Workspace::Frame frame(ws);
    ws.take<float>(1000);  // 4000 bytes: more than planned, so the workspace grows
    CHECK(ws.growths() == 1);
    CHECK(ws.peak_bytes() == 4032);
  }
  ws.reset_peak();
  CHECK(ws.peak_bytes() == 0);
  ws.reserve(8192);  // folds the extra block into one
  CHECK(ws.total_capacity() >= 8192);

  WorkspacePool pool(2);
  pool.reserve_each(128);
  pool[0].take<char>(10);
  pool[1].take<char>(100);
  CHECK(pool.peak_bytes() == 64 + 128);
  CHECK(pool.growths() == 0);
}

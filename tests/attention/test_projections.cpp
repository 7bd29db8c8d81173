// Linformer's sequence projections on their own, against naive double references.
#include <catch2/catch.hpp>

#include <tuple>

#include "effattn/attention/projections/dense_projection.hpp"
#include "effattn/core/counter_rng.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

TEST_CASE("DenseProjection over several token blocks equals E·x, with dx and dE",
          "[lowrank][projection][kernel]") {
  // More tokens than one block of the products (1024), a tail block, odd widths and padding:
  // y = E[:, :valid]·x[:valid], dx = E[:, :valid]ᵀ·dy (0 on padding), dE[:, :valid] = dy·xᵀ.
  for (const auto& [n, valid, w, k] : {std::tuple<Index, Index, Index, Index>{2500, 2300, 40, 70},
                                       {1024, 1024, 64, 256},
                                       {3000, 1, 3, 5},
                                       {700, 650, 1, 33}}) {
    CAPTURE(n, valid, w, k);
    DenseProjection<float> proj({.k = k, .n_max = n + 7}, CounterRng(3));
    Matrix<float> x(n, w), dy(k, w), y(k, w), dx(n, w);
    CounterRng(4).fill_normal(x);
    CounterRng(5).fill_normal(dy);
    Workspace ws;
    ws.reserve(proj.scratch_bytes(n, w));
    proj.forward(x, valid, y, ws);
    proj.zero_grad();
    dx.setConstant(1.0f);  // padding rows must be overwritten
    proj.backward(x, valid, dy, dx, ws);
    CHECK(ws.growths() == 0);

    const MatD e = proj.weight().cast<double>().leftCols(valid);
    const MatD xv = x.cast<double>().topRows(valid);
    CHECK(reference::relative_error(y, e * xv) < 1e-5);
    MatD dx_want = MatD::Zero(n, w);
    dx_want.topRows(valid) = e.transpose() * dy.cast<double>();
    CHECK(reference::relative_error(dx, dx_want) < 1e-5);
    MatD de_want = MatD::Zero(k, n + 7);
    de_want.leftCols(valid) = dy.cast<double>() * xv.transpose();
    CHECK(reference::relative_error(proj.gradient(), de_want) < 1e-5);
  }
}

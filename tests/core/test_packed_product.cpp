// Products (core/packed_product.hpp) and the micro-kernel under it, against double products.
#include <catch2/catch.hpp>

#include <tuple>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/micro_kernel.hpp"
#include "effattn/core/packed_product.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

TEMPLATE_TEST_CASE("Products equal double products for row-major and transposed operands",
                   "[kernel]", float, double) {
  using S = TestType;
  const double tolerance = std::is_same_v<S, float> ? 1e-5 : 1e-13;
  // Shapes with row tails (m not a multiple of 12 or 6), panel tails (n not a multiple of 32
  // or 16), depth 1, and operands read from inside larger matrices (row strides ≠ widths).
  for (const auto& [m, n, k] : {std::tuple<Index, Index, Index>{1, 1, 1},
                                {13, 33, 7},
                                {12, 32, 64},
                                {25, 100, 1},
                                {7, 3, 300},
                                {96, 65, 129}}) {
    CAPTURE(m, n, k);
    Matrix<S> a_store(m + 3, k + 5), at_store(k + 2, m + 4), b_store(k + 1, n + 6),
        bt_store(n + 3, k + 2), c_store(m + 2, n + 7);
    CounterRng(1).fill_normal(a_store);
    CounterRng(2).fill_normal(at_store);
    CounterRng(3).fill_normal(b_store);
    CounterRng(4).fill_normal(bt_store);
    CounterRng(5).fill_normal(c_store);
    const auto a = a_store.block(1, 2, m, k);
    const auto at = at_store.block(1, 3, k, m).transpose();  // A read through strides
    const auto b = b_store.block(1, 4, k, n);
    const auto bt = bt_store.block(2, 1, n, k).transpose();  // B packed from its transpose
    Workspace ws;
    const std::size_t floats = detail::Products<S>::capacity(k, n);
    ws.reserve(detail::Products<S>::bytes(floats));
    const detail::Products<S> mul(ws, floats);
    for (int form = 0; form < 4; ++form) {
      CAPTURE(form);
      const MatD lhs =
          form % 2 == 0 ? MatD(a.template cast<double>()) : MatD(at.template cast<double>());
      const MatD rhs =
          form < 2 ? MatD(b.template cast<double>()) : MatD(bt.template cast<double>());
      auto c = c_store.block(1, 3, m, n);
      const MatD before = c.template cast<double>();
      const auto run = [&](auto&& op) {
        if (form == 0) op(c, a, b);
        if (form == 1) op(c, at, b);
        if (form == 2) op(c, a, bt);
        if (form == 3) op(c, at, bt);
      };
      run([&](auto& dst, const auto& x, const auto& y) { mul.add(dst, x, y); });
      CHECK(reference::relative_error(c, before + lhs * rhs) < tolerance);
      run([&](auto& dst, const auto& x, const auto& y) { mul.assign(dst, x, y); });
      CHECK(reference::relative_error(c, lhs * rhs) < tolerance);
    }
    // Nothing outside the destination block was written.
    Matrix<S> outside = c_store;
    outside.block(1, 3, m, n).setZero();
    Matrix<S> fresh(m + 2, n + 7);
    CounterRng(5).fill_normal(fresh);
    fresh.block(1, 3, m, n).setZero();
    CHECK(outside == fresh);
    CHECK(ws.growths() == 0);
  }
}

TEMPLATE_TEST_CASE("Products with a kept (packed once) operand equal those that pack it each time",
                   "[kernel]", float, double) {
  using S = TestType;
  const Index m = 19, n = 37, k = 45;
  Matrix<S> a(m, k), b_store(n + 2, k + 3), c1(m, n), c2(m, n);
  CounterRng(9).fill_normal(a);
  CounterRng(10).fill_normal(b_store);
  CounterRng(11).fill_normal(c1);
  c2 = c1;
  const auto b = b_store.block(1, 2, n, k).transpose();  // k × n, read through strides
  Workspace ws;
  const Index floats = detail::Products<S>::capacity(k, n);
  ws.reserve(detail::Products<S>::bytes(floats) + detail::Products<S>::kept_bytes(k, n));
  const detail::Products<S> mul(ws, floats);
  const auto kept = mul.keep(ws, b);
  for (int round = 0; round < 2; ++round) {  // the kept panels serve any number of products
    mul.add(c1, a, b);
    mul.add(c2, a, kept);
    CHECK(c1 == c2);
    mul.assign(c1, a, b);
    mul.assign(c2, a, kept);
    CHECK(c1 == c2);
  }
  CHECK(reference::relative_error(c2,
                                  (a.template cast<double>() * b.template cast<double>()).eval()) <
        (std::is_same_v<S, float> ? 1e-5 : 1e-13));
  CHECK(ws.growths() == 0);
}

TEST_CASE("The micro-kernel's rescaling update: C = diag(scale)·C + A·B", "[kernel]") {
  const Index m = 29, n = 45, k = 17;
  Matrix<float> a(m, k), b(k, n), c(m, n);
  CounterRng(6).fill_normal(a);
  CounterRng(7).fill_normal(b);
  CounterRng(8).fill_normal(c);
  Eigen::VectorXf scale = Eigen::VectorXf::LinSpaced(m, -1.0f, 2.0f);
  std::vector<float> packed(static_cast<std::size_t>(detail::kernel::padded(n) * k));
  detail::kernel::pack_rows(b.data(), n, k, n, packed.data());
  const MatD want =
      scale.cast<double>().asDiagonal() * c.cast<double>() + a.cast<double>() * b.cast<double>();
  detail::kernel::gemm(m, n, k, {a.data(), k}, packed.data(), detail::kernel::panel * k, c.data(),
                       n, detail::kernel::Update::rescale, scale.data());
  CHECK(reference::relative_error(c, want) < 1e-5);
}

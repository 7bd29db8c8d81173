// Proves the kernels' loops never touch the heap: Eigen's EIGEN_RUNTIME_NO_MALLOC makes
// any Eigen allocation assert while it is forbidden, and the Workspace counts its growths.
// Its own executable, because the macro changes Eigen's inline functions.
#define EIGEN_RUNTIME_NO_MALLOC
#undef NDEBUG
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include "effattn/attention/favor.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/core/rng.hpp"

using namespace effattn;

TEMPLATE_TEST_CASE("FullAttention forward and backward allocate nothing once planned",
                   "[full][allocation]", float, double) {
  using S = TestType;
  const FullAttention<S> attn;  // the default tiles: what users get
  for (const Index d : {1, 16, 64, 96, 128, 256}) {
    CAPTURE(d);
    const Index n = 700;
    Matrix<S> q(n, d), k(n, d), v(n, d), out(n, d), d_out(n, d), dq(n, d), dk(n, d), dv(n, d);
    CounterRng(1).fill_normal(q);
    CounterRng(2).fill_normal(k);
    CounterRng(3).fill_normal(v);
    CounterRng(4).fill_normal(d_out);
    auto saved = attn.make_saved(n, n);
    Workspace ws;
    ws.reserve(attn.scratch_bytes(n, n, d, d));
    for (const bool causal : {false, true}) {
      const HeadContext ctx{0, 0, 0, n - 7, 0, causal};
      Eigen::internal::set_is_malloc_allowed(false);
      attn.forward(q, k, v, out, &saved, ctx, ws);
      attn.backward(q, k, v, out, d_out, saved, dq, dk, dv, ctx, ws);
      Eigen::internal::set_is_malloc_allowed(true);
    }
    CHECK(ws.growths() == 0);
    CHECK(out.allFinite());
    CHECK(dq.allFinite());
  }
}

TEMPLATE_TEST_CASE("Favor forward and backward allocate nothing once planned",
                   "[favor][allocation]", PositiveSoftmaxFeatures, HyperbolicSoftmaxFeatures) {
  const Index n = 300, d = 64;
  const Favor<float, TestType> favor({}, HeadLayout{1, d, d, 1});  // m = 256, the default
  Matrix<float> q(n, d), k(n, d), v(n, d), out(n, d), d_out(n, d), dq(n, d), dk(n, d), dv(n, d);
  CounterRng(1).fill_normal(q);
  CounterRng(2).fill_normal(k);
  CounterRng(3).fill_normal(v);
  CounterRng(4).fill_normal(d_out);
  Workspace ws;
  ws.reserve(favor.scratch_bytes(n, n, d, d));
  for (const bool causal : {false, true}) {
    const HeadContext ctx{0, 0, 0, n - 7, 0, causal};
    Eigen::internal::set_is_malloc_allowed(false);
    favor.forward(q, k, v, out, nullptr, ctx, ws);
    favor.backward(q, k, v, out, d_out, {}, dq, dk, dv, ctx, ws);
    Eigen::internal::set_is_malloc_allowed(true);
  }
  CHECK(ws.growths() == 0);
  CHECK(dk.allFinite());
}

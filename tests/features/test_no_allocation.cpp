// Proves the kernels' loops never touch the heap: Eigen's EIGEN_RUNTIME_NO_MALLOC makes
// any Eigen allocation assert while it is forbidden, and the Workspace counts its growths.
// Its own executable, because the macro changes Eigen's inline functions.
#define EIGEN_RUNTIME_NO_MALLOC
#undef NDEBUG
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include "effattn/attention/favor.hpp"
#include "effattn/attention/feature_maps/hyperbolic_softmax_features.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/attention/low_rank.hpp"
#include "effattn/attention/lsh.hpp"
#include "effattn/core/counter_rng.hpp"

using namespace effattn;

namespace {

/// One head's inputs (standard normal, fixed seeds), its output and its gradients.
template <class S>
struct Head {
  Head(Index n, Index d)
      : q(n, d), k(n, d), v(n, d), out(n, d), d_out(n, d), dq(n, d), dk(n, d), dv(n, d) {
    CounterRng(1).fill_normal(q);
    CounterRng(2).fill_normal(k);
    CounterRng(3).fill_normal(v);
    CounterRng(4).fill_normal(d_out);
  }
  Matrix<S> q, k, v, out, d_out, dq, dk, dv;
};

}  // namespace

TEMPLATE_TEST_CASE("FullAttention forward and backward allocate nothing once planned",
                   "[full][allocation]", float, double) {
  using S = TestType;
  const FullAttention<S> attn;  // the default tiles: what users get
  for (const Index d : {1, 16, 64, 96, 128, 256}) {
    CAPTURE(d);
    const Index n = 700;
    Head<S> h(n, d);
    auto saved = attn.make_saved(n, n);
    Workspace ws;
    ws.reserve(attn.scratch_bytes(n, n, d, d));
    for (const bool causal : {false, true}) {
      const HeadContext ctx{0, 0, 0, n - 7, 0, causal};
      Eigen::internal::set_is_malloc_allowed(false);
      attn.forward(h.q, h.k, h.v, h.out, &saved, ctx, ws);
      attn.backward(h.q, h.k, h.v, h.out, h.d_out, saved, h.dq, h.dk, h.dv, ctx, ws);
      Eigen::internal::set_is_malloc_allowed(true);
    }
    CHECK(ws.growths() == 0);
    CHECK(h.out.allFinite());
    CHECK(h.dq.allFinite());
  }
}

TEMPLATE_TEST_CASE("Favor forward and backward allocate nothing once planned",
                   "[favor][allocation]", PositiveSoftmaxFeatures, HyperbolicSoftmaxFeatures) {
  const Index n = 300, d = 64;
  const Favor<float, TestType> favor({}, HeadLayout{1, d, d, 1});  // m = 256, the default
  Head<float> h(n, d);
  Workspace ws;
  ws.reserve(favor.scratch_bytes(n, n, d, d));
  for (const bool causal : {false, true}) {
    const HeadContext ctx{0, 0, 0, n - 7, 0, causal};
    Eigen::internal::set_is_malloc_allowed(false);
    favor.forward(h.q, h.k, h.v, h.out, nullptr, ctx, ws);
    favor.backward(h.q, h.k, h.v, h.out, h.d_out, {}, h.dq, h.dk, h.dv, ctx, ws);
    Eigen::internal::set_is_malloc_allowed(true);
  }
  CHECK(ws.growths() == 0);
  CHECK(h.dk.allFinite());
}

template <template <class> class P>
struct ProjectionKind {
  using Policy = LowRank<float, P>;
};

TEMPLATE_TEST_CASE("LowRank forward and backward allocate nothing once planned",
                   "[lowrank][allocation]", ProjectionKind<DenseProjection>,
                   ProjectionKind<MeanPooling>, ProjectionKind<MaxPooling>,
                   ProjectionKind<ConvProjection>) {
  using Policy = typename TestType::Policy;
  const Index n = 512, d = 64;
  typename Policy::Config config{};
  if constexpr (requires { config.projection.n_max; })
    config.projection = {.k = 256, .n_max = n};
  else
    config.projection = {.kernel = 4};
  Policy policy(config, HeadLayout{1, d, d, 1});
  Head<float> h(n, d);
  auto saved = policy.make_saved(n, n);
  policy.visit_parameters([](auto, auto&, auto&) {});  // gradients exist from here on
  Workspace ws;
  ws.reserve(policy.scratch_bytes(n, n, d, d));
  for (const Index valid : {n, n - 7}) {
    const HeadContext ctx{0, 0, 0, valid, 0, false};
    Eigen::internal::set_is_malloc_allowed(false);
    policy.forward(h.q, h.k, h.v, h.out, &saved, ctx, ws);
    policy.backward(h.q, h.k, h.v, h.out, h.d_out, saved, h.dq, h.dk, h.dv, ctx, ws);
    policy.forward(h.q, h.k, h.v, h.out, nullptr, ctx, ws);
    Eigen::internal::set_is_malloc_allowed(true);
  }
  CHECK(ws.growths() == 0);
  CHECK(h.out.allFinite());
  CHECK(h.dk.allFinite());
}

TEST_CASE("LSHAttention forward and backward allocate nothing once planned", "[lsh][allocation]") {
  const Index n = 700, d = 64;
  for (const bool dedup : {false, true}) {
    const LSHAttention<float> lsh({.dedup = dedup}, HeadLayout{1, d, d, 1});  // c = 64, 4 rounds
    Head<float> h(n, d);
    auto saved = lsh.make_saved(n, n);
    Workspace ws;
    ws.reserve(lsh.scratch_bytes(n, n, d, d));
    lsh.validate(n, n, d, d, false);  // planning the call draws the rotations it needs
    for (const bool causal : {false, true}) {
      const HeadContext ctx{0, 0, 0, n - 7, 0, causal};
      Eigen::internal::set_is_malloc_allowed(false);
      lsh.forward(h.q, h.q, h.v, h.out, &saved, ctx, ws);
      lsh.backward(h.q, h.q, h.v, h.out, h.d_out, saved, h.dq, h.dk, h.dv, ctx, ws);
      Eigen::internal::set_is_malloc_allowed(true);
    }
    CHECK(ws.growths() == 0);
    CHECK(h.out.allFinite());
    CHECK(h.dq.allFinite());
  }
}

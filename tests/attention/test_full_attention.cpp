// FullAttention against the naive double-precision reference, forward and backward.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "effattn/attention/full_attention.hpp"
#include "effattn/core/counter_rng.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

template <class S>
double tolerance() {
  return std::is_same_v<S, float> ? 2e-5 : 1e-12;
}

struct Problem {
  Index n_q, n_k, d_k, d_v;
  bool causal = false;
  Index key_length = -1;  // -1: all keys
  Index query_tile = 16, key_tile = 8;
};

template <class S>
struct Inputs {
  Matrix<S> q, k, v;
  explicit Inputs(const Problem& p, std::uint64_t seed = 1, double spread = 1.0)
      : q(p.n_q, p.d_k), k(p.n_k, p.d_k), v(p.n_k, p.d_v) {
    CounterRng(seed, 0).fill_normal(q, spread);
    CounterRng(seed, 1).fill_normal(k, spread);
    CounterRng(seed, 2).fill_normal(v);
  }
};

HeadContext context_of(const Problem& p, Index query_offset = 0) {
  return HeadContext{
      0, 0, query_offset, p.key_length < 0 ? p.n_k : p.key_length, p.n_k - p.n_q, p.causal};
}

reference::Mask mask_of(const Problem& p) {
  return {p.causal, p.key_length < 0 ? p.n_k : p.key_length, p.n_k - p.n_q};
}

template <class S>
FullAttention<S> policy_for(const Problem& p) {
  return FullAttention<S>({p.query_tile, p.key_tile, {}}, HeadLayout{});
}

template <class S>
Matrix<S> run_forward(const FullAttention<S>& attn, const Problem& p, const Inputs<S>& in,
                      typename FullAttention<S>::Saved* saved, Workspace& ws) {
  Matrix<S> out(p.n_q, p.d_v);
  ws.reserve(attn.scratch_bytes(p.n_q, p.n_k, p.d_k, p.d_v));
  attn.forward(in.q, in.k, in.v, out, saved, context_of(p), ws);
  return out;
}

const std::vector<Problem>& problems() {
  static const std::vector<Problem> all = {
      {1, 1, 1, 1},  // the smallest problem
      {1, 1, 4, 4, true},
      {37, 37, 8, 8},  // n not a multiple of either tile
      {37, 37, 8, 8, true},
      {64, 64, 16, 16, true, -1, 16, 16},  // tiles exactly on the diagonal
      {20, 45, 5, 7},                      // cross-attention, d_k != d_v
      {45, 20, 5, 7},                      // more queries than keys
      {45, 20, 6, 3, true},                // causal with n_q > n_k: early rows see no key
      {12, 50, 3, 3, true},                // causal decoding against a longer cache
      {40, 40, 8, 8, false, 23},           // key padding
      {40, 40, 8, 8, true, 23},            // padding and causal
      {33, 33, 128, 64, false, -1, 32, 64},
      {50, 70, 2, 9, false, -1, 64, 256},  // tiles larger than the problem
      {9, 9, 4, 4, false, 0},              // every key padded: every row is empty
  };
  return all;
}

}  // namespace

TEMPLATE_TEST_CASE("FullAttention forward equals the naive reference", "[full][forward]", float,
                   double) {
  using S = TestType;
  for (const Problem& p : problems()) {
    CAPTURE(p.n_q, p.n_k, p.d_k, p.d_v, p.causal, p.key_length, p.query_tile, p.key_tile);
    const auto attn = policy_for<S>(p);
    const Inputs<S> in(p);
    Workspace ws;
    auto saved = attn.make_saved(p.n_q, p.n_k);
    const Matrix<S> out = run_forward(attn, p, in, &saved, ws);
    const MatD expected = reference::attention(
        in.q.template cast<double>(), in.k.template cast<double>(), in.v.template cast<double>(),
        1.0 / std::sqrt(double(p.d_k)), mask_of(p));
    if (expected.norm() == 0)
      CHECK(out.isZero(0));
    else
      CHECK(reference::relative_error(out, expected) < tolerance<S>());
    CHECK(ws.growths() == 0);
    CHECK(ws.peak_bytes() <= attn.scratch_bytes(p.n_q, p.n_k, p.d_k, p.d_v));
    CHECK(out.allFinite());
  }
}

TEST_CASE("FullAttention's packed float kernels at awkward shapes, with their default tiles",
          "[full][forward][backward][kernel]") {
  // Default tiles (forward 96 queries × 512 keys, backward 96 × 384), so the micro-kernel's row
  // and panel tails (also of the transposed operands backward reads through strides), several
  // key tiles, the causal diagonal inside a tile and padding in the first and last tiles occur.
  const FullAttention<float> attn;
  for (const Index d : {1, 3, 64, 80, 128, 256})
    for (const Problem base :
         {Problem{131, 1030, 0, 0}, Problem{7, 600, 0, 0, true}, Problem{600, 600, 0, 0, true},
          Problem{97, 1030, 0, 0, false, 5}, Problem{200, 1030, 0, 0, true, 1027}}) {
      Problem p = base;
      p.d_k = d;
      p.d_v = d == 1 ? 3 : d;
      CAPTURE(p.n_q, p.n_k, d, p.causal, p.key_length);
      const Inputs<float> in(p, 7, 1.5);
      Workspace ws;
      auto saved = attn.make_saved(p.n_q, p.n_k);
      const Matrix<float> out = run_forward(attn, p, in, &saved, ws);
      const auto [q, k, v] =
          std::tuple{in.q.cast<double>(), in.k.cast<double>(), in.v.cast<double>()};
      const double scale = 1.0 / std::sqrt(double(d));
      CHECK(reference::relative_error(out, reference::attention(q, k, v, scale, mask_of(p))) <
            2e-5);

      Matrix<float> d_out(p.n_q, p.d_v);
      CounterRng(6).fill_normal(d_out);
      Matrix<float> dq(p.n_q, p.d_k), dk(p.n_k, p.d_k), dv(p.n_k, p.d_v);
      dk.setConstant(std::numeric_limits<float>::quiet_NaN());  // padded keys must be written
      attn.backward(in.q, in.k, in.v, out, d_out, saved, dq, dk, dv, context_of(p), ws);
      const auto expected =
          reference::attention_backward(q, k, v, d_out.cast<double>(), scale, mask_of(p));
      CHECK(reference::relative_error(dq, expected.dq) < 1e-4);
      CHECK(reference::relative_error(dk, expected.dk) < 1e-4);
      CHECK(reference::relative_error(dv, expected.dv) < 1e-4);
      CHECK(ws.growths() == 0);
      CHECK(ws.peak_bytes() <= attn.scratch_bytes(p.n_q, p.n_k, p.d_k, p.d_v));
    }
}

TEMPLATE_TEST_CASE("FullAttention on query slices equals one call on the whole head",
                   "[full][forward]", float, double) {
  using S = TestType;
  for (const bool causal : {false, true}) {
    const Problem p{53, 53, 8, 8, causal, 47};
    const auto attn = policy_for<S>(p);
    const Inputs<S> in(p);
    Workspace ws;
    auto whole_saved = attn.make_saved(p.n_q, p.n_k);
    const Matrix<S> whole = run_forward(attn, p, in, &whole_saved, ws);
    Matrix<S> sliced(p.n_q, p.d_v);
    auto sliced_saved = attn.make_saved(p.n_q, p.n_k);
    for (const auto& [q0, rows] : {std::pair<Index, Index>{0, 20}, {20, 1}, {21, 32}}) {
      attn.forward(in.q.middleRows(q0, rows), in.k, in.v, sliced.middleRows(q0, rows),
                   &sliced_saved, context_of(p, q0), ws);
    }
    CHECK(reference::relative_error(sliced, whole) < tolerance<S>());
    CHECK(reference::relative_error(sliced_saved.lse, whole_saved.lse) < tolerance<S>());
  }
}

TEMPLATE_TEST_CASE("FullAttention is stable for large logits and propagates NaN", "[full]", float,
                   double) {
  using S = TestType;
  const Problem p{24, 24, 16, 16, true};
  const auto attn = policy_for<S>(p);
  const Inputs<S> big(p, 3, 30.0);  // logits of order 30²·16/4 = 3600: exp would overflow
  Workspace ws;
  const Matrix<S> out = run_forward(attn, p, big, nullptr, ws);
  CHECK(out.allFinite());
  const MatD expected =
      reference::attention(big.q.template cast<double>(), big.k.template cast<double>(),
                           big.v.template cast<double>(), 0.25, mask_of(p));
  CHECK(reference::relative_error(out, expected) < 100 * tolerance<S>());

  Inputs<S> nan_in(p);
  nan_in.q(5, 3) = std::numeric_limits<S>::quiet_NaN();
  const Matrix<S> nan_out = run_forward(attn, p, nan_in, nullptr, ws);
  CHECK(nan_out.row(5).array().isNaN().all());
  CHECK(nan_out.row(4).allFinite());
}

TEMPLATE_TEST_CASE("FullAttention backward equals the naive reference gradients",
                   "[full][backward]", float, double) {
  using S = TestType;
  for (const Problem& p : problems()) {
    CAPTURE(p.n_q, p.n_k, p.d_k, p.d_v, p.causal, p.key_length);
    const auto attn = policy_for<S>(p);
    const Inputs<S> in(p);
    Workspace ws;
    auto saved = attn.make_saved(p.n_q, p.n_k);
    const Matrix<S> out = run_forward(attn, p, in, &saved, ws);
    Matrix<S> d_out(p.n_q, p.d_v);
    CounterRng(9).fill_normal(d_out);
    Matrix<S> dq(p.n_q, p.d_k), dk(p.n_k, p.d_k), dv(p.n_k, p.d_v);
    attn.backward(in.q, in.k, in.v, out, d_out, saved, dq, dk, dv, context_of(p), ws);
    const auto expected = reference::attention_backward(
        in.q.template cast<double>(), in.k.template cast<double>(), in.v.template cast<double>(),
        d_out.template cast<double>(), 1.0 / std::sqrt(double(p.d_k)), mask_of(p));
    for (const auto& [got, want] : {std::pair{&dq, &expected.dq}, std::pair{&dk, &expected.dk},
                                    std::pair{&dv, &expected.dv}}) {
      if (want->norm() == 0)  // e.g. one visible key: dS = P ∘ (dP − D) is 0 up to rounding
        CHECK(got->norm() < 10 * tolerance<S>());
      else
        CHECK(reference::relative_error(*got, *want) < 10 * tolerance<S>());
    }
    CHECK(ws.growths() == 0);
  }
}

TEST_CASE("FullAttention gradients match finite differences (double)", "[full][backward]") {
  for (const Problem& p : {Problem{7, 7, 3, 2, true}, Problem{5, 9, 4, 3, false, 6},
                           Problem{10, 10, 2, 2, false, -1, 4, 3}}) {
    CAPTURE(p.n_q, p.n_k, p.causal, p.key_length);
    const auto attn = policy_for<double>(p);
    Inputs<double> in(p, 11);
    Matrix<double> weights(p.n_q, p.d_v);  // loss = Σ weights ∘ out
    CounterRng(12).fill_normal(weights);
    Workspace ws;
    auto loss = [&] {
      const Matrix<double> out = run_forward(attn, p, in, nullptr, ws);
      return out.cwiseProduct(weights).sum();
    };
    auto saved = attn.make_saved(p.n_q, p.n_k);
    const Matrix<double> out = run_forward(attn, p, in, &saved, ws);
    Matrix<double> dq(p.n_q, p.d_k), dk(p.n_k, p.d_k), dv(p.n_k, p.d_v);
    attn.backward(in.q, in.k, in.v, out, weights, saved, dq, dk, dv, context_of(p), ws);
    CHECK(reference::gradient_error(dq, reference::numeric_gradient(loss, in.q)) < 1e-7);
    CHECK(reference::gradient_error(dk, reference::numeric_gradient(loss, in.k)) < 1e-7);
    CHECK(reference::gradient_error(dv, reference::numeric_gradient(loss, in.v)) < 1e-7);
  }
}

TEST_CASE("FullAttention rejects bad configuration", "[full][errors]") {
  using A = FullAttention<float>;
  const A ok;
  CHECK_THROWS_AS(A({-1, 8, {}}, HeadLayout{}), Error);
  CHECK_THROWS_WITH(A({8, -4, {}}, HeadLayout{}), Catch::Contains("key_tile"));
  // Automatic tiles keep a d-wide slice of a tile within Eigen's stack buffer.
  for (const Index d : {1, 64, 100, 128, 400}) {
    const auto t = ok.tiles(d, d);
    CHECK(t.key * d * Index(sizeof(float)) <= EIGEN_STACK_ALLOCATION_LIMIT);
    CHECK((t.query + 48) * d * Index(sizeof(float)) <= EIGEN_STACK_ALLOCATION_LIMIT);
    CHECK(t.query >= 16);
  }
  CHECK(ok.tiles(64, 64).query == 256);
  CHECK(ok.tiles(64, 64).key == 512);
  CHECK(FullAttention<double>().tiles(64, 64).query == 128);
  CHECK(FullAttention<double>().tiles(64, 64).key == 256);
  CHECK_THROWS_WITH(A({8, 8, -1.0}, HeadLayout{}), Catch::Contains("scale"));
  CHECK_THROWS_WITH(ok.validate(0, 4, 4, 4, false), Catch::Contains("n_q"));
  CHECK_THROWS_WITH(ok.validate(4, 4, 0, 4, false), Catch::Contains("d_k"));
  CHECK_NOTHROW(ok.validate(3, 5, 4, 2, true));
}

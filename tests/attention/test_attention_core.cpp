// AttentionCore: scheduling of (sequence, head) problems, query splits, saved state, errors.
#include <catch2/catch.hpp>

#include <cmath>

#include "effattn/attention/attention_core.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/core/counter_rng.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

template <class Masking>
void check_against_reference(const SequenceShape& shape, Index heads, Index d) {
  const bool causal = Masking::causal;
  AttentionCore<FullAttention<double>, Masking> core({}, HeadLayout{heads, d, d, 0});
  const Index t = shape.tokens();
  Matrix<double> q(t, heads * d), k(t, heads * d), v(t, heads * d), out(t, heads * d);
  CounterRng(1).fill_normal(q);
  CounterRng(2).fill_normal(k);
  CounterRng(3).fill_normal(v);
  core.forward(q, k, v, out, shape, shape, true);
  CHECK(core.has_saved());
  CHECK(core.scratch_growths() == 0);

  Matrix<double> d_out(t, heads * d), dq(t, heads * d), dk(t, heads * d), dv(t, heads * d);
  CounterRng(4).fill_normal(d_out);
  core.backward(q, k, v, out, d_out, dq, dk, dv, shape, shape);

  const double scale = 1.0 / std::sqrt(double(d));
  for (Index b = 0; b < shape.batch; ++b)
    for (Index h = 0; h < heads; ++h) {
      CAPTURE(b, h);
      const reference::Mask mask{causal, shape.valid_length(b), 0};
      auto blk = [&](const Matrix<double>& m) -> MatD {
        return m.block(b * shape.seq, h * d, shape.seq, d);
      };
      CHECK(reference::relative_error(
                blk(out), reference::attention(blk(q), blk(k), blk(v), scale, mask)) < 1e-12);
      const auto g = reference::attention_backward(blk(q), blk(k), blk(v), blk(d_out), scale, mask);
      CHECK(reference::gradient_error(blk(dq), g.dq) < 1e-12);
      CHECK(reference::gradient_error(blk(dk), g.dk) < 1e-12);
      CHECK(reference::gradient_error(blk(dv), g.dv) < 1e-12);
    }
}

}  // namespace

TEST_CASE("AttentionCore splits a lone head's queries and still matches the reference",
          "[core_attention]") {
  // One problem and 300 queries: with two or more threads the head is split into slices,
  // each writing its rows of the output and of the saved log-sum-exp.
  check_against_reference<Bidirectional>({1, 300, {}}, 1, 8);
  check_against_reference<Causal>({1, 300, {}}, 1, 8);
  check_against_reference<Causal>({2, 130, {130, 77}}, 1, 4);
  // Many problems: one task per (sequence, head).
  check_against_reference<Causal>({3, 40, {40, 1, 0}}, 3, 4);
}

TEST_CASE("AttentionCore rejects mismatched inputs", "[core_attention][errors]") {
  AttentionCore<FullAttention<float>> core({}, HeadLayout{2, 4, 3, 0});
  Matrix<float> q(10, 8), k(10, 8), v(10, 6), out(10, 6), bad(10, 7);
  q.setOnes();
  k.setOnes();
  v.setOnes();
  CHECK_NOTHROW(core.forward(q, k, v, out, {2, 5}, {2, 5}, false));
  CHECK_THROWS_WITH(
      core.forward(bad, k, v, out, {2, 5}, {2, 5}, false),
      Catch::Contains("AttentionCore") && Catch::Contains("'q'") && Catch::Contains("10×8"));
  CHECK_THROWS_WITH(core.forward(q, k, bad, out, {2, 5}, {2, 5}, false), Catch::Contains("'v'"));
  CHECK_THROWS_WITH(core.forward(q, k, v, bad, {2, 5}, {2, 5}, false), Catch::Contains("'out'"));
  CHECK_THROWS_WITH(core.forward(q, k, v, out, {2, 5}, {1, 10}, false),
                    Catch::Contains("kv_shape.batch"));
  Matrix<float> dq(10, 8), dk(10, 8), dv(10, 6);
  CHECK_THROWS_WITH(core.backward(q, k, v, out, out, dq, dk, dv, {2, 5}, {2, 5}),
                    Catch::Contains("without a forward that kept its state"));
  core.forward(q, k, v, out, {2, 5}, {2, 5}, true);
  CHECK_THROWS_WITH(
      core.backward(q, k, v, out, out, dq, dk, dv, {1, 10}, {1, 10}),
      Catch::Contains("'q_shape.batch'") && Catch::Contains("the forward's batch, 2"));
  CHECK_NOTHROW(core.backward(q, k, v, out, out, dq, dk, dv, {2, 5}, {2, 5}));
  core.release_saved();
  CHECK_FALSE(core.has_saved());
}

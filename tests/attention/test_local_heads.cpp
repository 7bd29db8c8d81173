// LocalHeads<Global>: the local heads are exact attention in a window, the others the global
// policy, in one block.
#include <catch2/catch.hpp>

#include <type_traits>

#include "effattn/attention/attention_core.hpp"
#include "effattn/attention/favor.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/attention/local_heads.hpp"
#include "effattn/attention/low_rank.hpp"
#include "effattn/attention/lsh.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/layers/multi_head_attention.hpp"
#include "effattn/layers/redraw.hpp"
#include "layer_testing.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

bool same_bits(const Matrix<double>& a, const Matrix<double>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
}

// A core of 4 heads, `local` of them local with a window of `window` keys, against windowed
// exact attention on the local heads' columns and the global policy on the others' (a block of
// 4 − local heads, seeded alike): forward and the three gradients, bit for bit.
template <class Masking, class Global>
void check_heads(typename Global::Config global, Index local, Index window) {
  constexpr bool shared = detail::policy_shares_qk<Global>;
  const Index heads = 4, d = 8;
  const SequenceShape shape{2, 90, {90, 53}};
  const Index rows = shape.tokens();
  Matrix<double> q(rows, heads * d), k(rows, heads * d), v(rows, heads * d);
  Matrix<double> d_out(rows, heads * d);
  CounterRng(1).fill_normal(q);
  CounterRng(2).fill_normal(k);
  CounterRng(3).fill_normal(v);
  CounterRng(4).fill_normal(d_out);
  if (shared) k = q;
  struct Result {
    Matrix<double> out, dq, dk, dv;
  };
  const auto run = [&](auto& core, Index from, Index count) {
    const auto cols = [&](const Matrix<double>& m) -> Matrix<double> {
      return m.middleCols(from * d, count * d);
    };
    const Matrix<double> qs = cols(q), ks = cols(k), vs = cols(v), ds = cols(d_out);
    Result r{Matrix<double>(rows, count * d), Matrix<double>(rows, count * d),
             Matrix<double>(rows, count * d), Matrix<double>(rows, count * d)};
    core.forward(qs, ks, vs, r.out, shape, shape, true);
    core.backward(qs, ks, vs, r.out, ds, r.dq, r.dk, r.dv, shape, shape);
    if (shared) r.dq += r.dk;  // the keys were the queries
    return r;
  };
  const typename FullAttention<double>::Config tiles{.query_tile = 16, .key_tile = 16};
  AttentionCore<LocalHeads<Global>, Masking> mixed(
      {.local_heads = local, .window = window, .local = tiles, .global = global},
      HeadLayout{heads, d, d, 5});
  const Result all = run(mixed, 0, heads);

  using Window = std::conditional_t<Masking::causal, CausalWindow<>, SlidingWindow<>>;
  AttentionCore<FullAttention<double>, Window> local_core(tiles, HeadLayout{local, d, d, 5},
                                                          Window{window});
  AttentionCore<Global, Masking> global_core(global, HeadLayout{heads - local, d, d, 5});
  const Result l = run(local_core, 0, local), g = run(global_core, local, heads - local);
  for (auto [mixed_part, part] : {std::pair{&all.out, std::pair{&l.out, &g.out}},
                                  {&all.dq, {&l.dq, &g.dq}},
                                  {&all.dk, {&l.dk, &g.dk}},
                                  {&all.dv, {&l.dv, &g.dv}}}) {
    CHECK(same_bits(mixed_part->leftCols(local * d), *part.first));
    CHECK(same_bits(mixed_part->rightCols((heads - local) * d), *part.second));
  }
  // The window mattered: the local heads differ from exact attention over every key.
  AttentionCore<FullAttention<double>, Masking> whole(tiles, HeadLayout{local, d, d, 5});
  CHECK(!same_bits(run(whole, 0, local).out, l.out));
}

}  // namespace

TEST_CASE("LocalHeads: local heads attend in their window, the others with the global policy",
          "[local_heads]") {
  check_heads<Causal, Favor<double>>({.features = 16, .chunk = 8}, 2, 7);
  check_heads<Causal, LSHAttention<double>>({.chunk = 8, .rounds = 2}, 1, 5);
  check_heads<Bidirectional, LowRank<double>>({.projection = {.k = 16, .n_max = 90}}, 3, 9);
}

TEST_CASE("A block of local and Favor heads trains and keeps Favor's features as its own",
          "[local_heads][mha]") {
  using Mixed = LocalHeads<Favor<double>>;
  static_assert(detail::HasRandomState<Mixed>);  // a checkpoint keeps the global heads' features
  static_assert(!detail::HasRandomState<LocalHeads<FullAttention<double>>>);
  using Block = MultiHeadAttention<Mixed, Causal>;
  Block block(
      {.d_model = 8,
       .heads = 4,
       .seed = 2,
       .policy = {
           .local_heads = 2, .window = 3, .global = {.features = 8, .chunk = 4, .epsilon = 0.0}}});
  // x and every parameter (the projections) against finite differences.
  Matrix<double> x(22, 8);
  CounterRng(5).fill_normal(x);
  layer_testing::check_gradients(block, x, SequenceShape{2, 11, {11, 7}});
  // The random state is the global policy's, and redraw reaches it.
  const auto before = block.policy().random_state();
  CHECK(before.tensors.size() == block.policy().global().random_state().tensors.size());
  redraw(block, 99);
  CHECK(
      !(block.policy().random_state().tensors[0].second.array() == before.tensors[0].second.array())
           .all());
  CHECK_THROWS_WITH(Block({.d_model = 8, .heads = 4, .policy = {.local_heads = 5}}),
                    Catch::Contains("LocalHeads") && Catch::Contains("'local_heads'"));
  CHECK_THROWS_WITH(Block({.d_model = 8, .heads = 4, .policy = {.local_heads = 1, .window = 0}}),
                    Catch::Contains("'window'"));
}

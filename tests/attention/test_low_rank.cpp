// LowRank (Linformer) against naive double references: softmax(s·q(Ek)ᵀ)(Fv) with every
// projection materialised, for every projection type and sharing mode.
#include <catch2/catch.hpp>

#include <cmath>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "effattn/attention/attention_core.hpp"
#include "effattn/attention/low_rank.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/layers/multi_head_attention.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

template <class P>
constexpr bool is_kind(std::string_view kind) {
  return std::string_view(P::name) == kind;
}

// The projection of x (padding rows from `valid` on) written out naively in double.
template <class P>
MatD naive_project(const P& proj, const MatD& x, Index valid) {
  const Index n = x.rows();
  MatD xz = x;
  xz.bottomRows(n - valid).setZero();
  if constexpr (is_kind<P>("dense")) {
    return proj.weight().leftCols(n).template cast<double>() * xz;
  } else {
    const Index kernel = proj.config().kernel, rows = n / kernel;
    MatD y = MatD::Zero(rows, x.cols());
    for (Index i = 0; i < rows; ++i)
      for (Index c = 0; c < x.cols(); ++c) {
        double acc = is_kind<P>("max_pooling") ? -INFINITY : 0.0;
        for (Index t = 0; t < kernel; ++t) {
          const Index j = i * kernel + t;
          if constexpr (is_kind<P>("mean_pooling")) acc += xz(j, c) / double(kernel);
          if constexpr (is_kind<P>("conv")) acc += double(proj.weight()(0, t)) * xz(j, c);
          if constexpr (is_kind<P>("max_pooling"))
            if (j < valid) acc = std::max(acc, x(j, c));
        }
        y(i, c) = std::isinf(acc) ? 0.0 : acc;  // a window of padding only
      }
    return y;
  }
}

template <class P>
Index naive_visible(const P& proj, Index n, Index valid) {
  if constexpr (is_kind<P>("dense"))
    return valid > 0 ? proj.config().k : 0;
  else
    return (valid + proj.config().kernel - 1) / proj.config().kernel;
  (void)n;
}

struct Problem {
  Index batch, heads, n_q, n_k, d_k, d_v;
  std::vector<Index> lengths;  // empty: no padding

  SequenceShape q_shape() const { return {batch, n_q}; }
  SequenceShape kv_shape() const { return {batch, n_k, lengths}; }
};

struct Data {
  Matrix<double> q, k, v, g;
  explicit Data(const Problem& p, std::uint64_t seed = 1)
      : q(p.batch * p.n_q, p.heads * p.d_k),
        k(p.batch * p.n_k, p.heads * p.d_k),
        v(p.batch * p.n_k, p.heads * p.d_v),
        g(p.batch * p.n_q, p.heads * p.d_v) {
    CounterRng(seed, 1).fill_normal(q);
    CounterRng(seed, 2).fill_normal(k);
    CounterRng(seed, 3).fill_normal(v);
    CounterRng(seed, 4).fill_normal(g);
  }
};

// Every (sequence, head) of the problem through the naive formula with the policy's own
// projections.
template <class Policy>
MatD naive_low_rank(const Policy& policy, const Problem& p, const Matrix<double>& q,
                    const Matrix<double>& k, const Matrix<double>& v) {
  MatD out(p.batch * p.n_q, p.heads * p.d_v);
  const double scale = 1.0 / std::sqrt(double(p.d_k));
  for (Index b = 0; b < p.batch; ++b)
    for (Index h = 0; h < p.heads; ++h) {
      const Index valid = p.kv_shape().valid_length(b);
      const auto& e = policy.projection(h, false);
      const auto& f = policy.projection(h, true);
      const MatD kp = naive_project(e, k.block(b * p.n_k, h * p.d_k, p.n_k, p.d_k), valid);
      const MatD vp = naive_project(f, v.block(b * p.n_k, h * p.d_v, p.n_k, p.d_v), valid);
      const reference::Mask mask{false, naive_visible(e, p.n_k, valid), 0};
      out.block(b * p.n_q, h * p.d_v, p.n_q, p.d_v) =
          reference::attention(q.block(b * p.n_q, h * p.d_k, p.n_q, p.d_k), kp, vp, scale, mask);
    }
  return out;
}

template <class Core, class M>
Matrix<typename Core::Scalar> run(Core& core, const Problem& p, const M& q, const M& k, const M& v,
                                  bool keep_saved = false) {
  Matrix<typename Core::Scalar> out(q.rows(), p.heads * p.d_v);
  core.forward(q, k, v, out, p.q_shape(), p.kv_shape(), keep_saved);
  CHECK(core.scratch_growths() == 0);
  return out;
}

// A projection type as a test parameter, with the settings of the small test problems:
// k = 6 rows of n_max = 32, or windows of 4 tokens.
template <template <class> class P>
struct Kind {
  template <class S>
  using Policy = LowRank<S, P>;
  template <class S>
  static typename Policy<S>::Config config(ProjectionSharing sharing) {
    typename Policy<S>::Config c;
    if constexpr (is_kind<P<S>>("dense"))
      c.projection = {.k = 6, .n_max = 32};
    else
      c.projection = {.kernel = 4};
    c.sharing = sharing;
    return c;
  }
};

const ProjectionSharing all_sharing[] = {ProjectionSharing::none, ProjectionSharing::headwise,
                                         ProjectionSharing::key_value,
                                         ProjectionSharing::layerwise};

const Problem problems[] = {
    {2, 3, 24, 24, 5, 4, {}},        // self-attention
    {2, 3, 24, 24, 5, 4, {24, 13}},  // key padding; 13 leaves a partly padded window
    {1, 2, 10, 28, 3, 6, {}},        // cross-attention, n_q ≠ n_k, d_k ≠ d_v
    {2, 1, 1, 8, 1, 1, {8, 0}},      // one query, a sequence of padding only
};

}  // namespace

TEMPLATE_TEST_CASE("LowRank equals the naive projected attention for every sharing mode",
                   "[lowrank]", Kind<DenseProjection>, Kind<MeanPooling>, Kind<MaxPooling>,
                   Kind<ConvProjection>) {
  using PolicyD = typename TestType::template Policy<double>;
  using PolicyF = typename TestType::template Policy<float>;
  for (const ProjectionSharing sharing : all_sharing)
    for (const Problem& p : problems) {
      CAPTURE(int(sharing), p.batch, p.heads, p.n_q, p.n_k, p.lengths);
      const HeadLayout layout{p.heads, p.d_k, p.d_v, 7};
      AttentionCore<PolicyD> core(TestType::template config<double>(sharing), layout);
      const Data data(p);
      const MatD expected = naive_low_rank(core.policy(), p, data.q, data.k, data.v);
      CHECK(reference::relative_error(run(core, p, data.q, data.k, data.v), expected) < 1e-12);

      // float: the same projections, rounded
      AttentionCore<PolicyF> core_f(TestType::template config<float>(sharing), layout);
      const Matrix<float> qf = data.q.cast<float>(), kf = data.k.cast<float>(),
                          vf = data.v.cast<float>();
      const MatD expected_f = naive_low_rank(core_f.policy(), p, data.q, data.k, data.v);
      CHECK(reference::relative_error(run(core_f, p, qf, kf, vf), expected_f) < 2e-5);
    }
}

TEST_CASE("LowRank's forward blocks (projected rows, query tiles) equal the naive attention",
          "[lowrank][threads]") {
  // k = 150 projected rows: blocks of 128 and 22 for E k and for F v; 700 queries: several
  // query blocks. Key padding, kept and not kept state, and more threads than the one head.
  const Problem p{2, 1, 700, 300, 8, 8, {300, 170}};
  const Data data(p);
  AttentionCore<LowRank<double>> core({.projection = {.k = 150, .n_max = 300}},
                                      HeadLayout{1, 8, 8, 3});
  const MatD expected = naive_low_rank(core.policy(), p, data.q, data.k, data.v);
  CHECK(core.policy().forward_blocks(700, 300, 8, 8, false, 1) > 6);
  for (const bool keep : {false, true}) {
    CAPTURE(keep);
    CHECK(reference::relative_error(run(core, p, data.q, data.k, data.v, keep), expected) < 1e-12);
  }
}

TEMPLATE_TEST_CASE("LowRank gradients match finite differences (double), projections included",
                   "[lowrank][backward]", Kind<DenseProjection>, Kind<MeanPooling>,
                   Kind<MaxPooling>, Kind<ConvProjection>) {
  using Policy = typename TestType::template Policy<double>;
  for (const ProjectionSharing sharing :
       {ProjectionSharing::none, ProjectionSharing::headwise, ProjectionSharing::key_value})
    for (const Problem& p : {Problem{2, 2, 8, 8, 3, 2, {8, 5}}, Problem{1, 2, 5, 12, 2, 3, {}}}) {
      CAPTURE(int(sharing), p.n_q, p.n_k, p.lengths);
      AttentionCore<Policy> core(TestType::template config<double>(sharing),
                                 HeadLayout{p.heads, p.d_k, p.d_v, 11});
      Data data(p, 3);
      auto loss = [&] { return run(core, p, data.q, data.k, data.v).cwiseProduct(data.g).sum(); };
      const MatD num_q = reference::numeric_gradient(loss, data.q);
      const MatD num_k = reference::numeric_gradient(loss, data.k);
      const MatD num_v = reference::numeric_gradient(loss, data.v);
      std::map<std::string, MatD> num_params;
      core.policy().visit_parameters([&](std::string_view name, Matrix<double>& value, auto&) {
        num_params[std::string(name)] = reference::numeric_gradient(loss, value);
      });
      CHECK(num_params.size() == (Policy::Proj::learned
                                      ? (sharing == ProjectionSharing::none       ? 4u
                                         : sharing == ProjectionSharing::headwise ? 2u
                                                                                  : 1u)
                                      : 0u));

      const Matrix<double> out = run(core, p, data.q, data.k, data.v, true);
      Matrix<double> dq(data.q.rows(), data.q.cols()), dk(data.k.rows(), data.k.cols()),
          dv(data.v.rows(), data.v.cols());
      core.policy().zero_grad();
      core.backward(data.q, data.k, data.v, out, data.g, dq, dk, dv, p.q_shape(), p.kv_shape());
      CHECK(core.scratch_growths() == 0);
      CHECK(reference::gradient_error(dq, num_q) < 1e-7);
      CHECK(reference::gradient_error(dk, num_k) < 1e-7);
      CHECK(reference::gradient_error(dv, num_v) < 1e-7);
      core.policy().visit_parameters(
          [&](std::string_view name, Matrix<double>&, Matrix<double>& gradient) {
            CAPTURE(std::string(name));
            CHECK(reference::gradient_error(gradient, num_params.at(std::string(name))) < 1e-7);
          });
    }
}

TEST_CASE("LowRank with k = n and E = F = identity (or windows of 1) is exact attention",
          "[lowrank]") {
  const Problem p{2, 2, 12, 12, 4, 3, {}};
  const Data data(p);
  const HeadLayout layout{p.heads, p.d_k, p.d_v, 5};
  const double scale = 1.0 / std::sqrt(double(p.d_k));
  auto exact = [&](const Problem& pp) {
    MatD out(pp.batch * pp.n_q, pp.heads * pp.d_v);
    for (Index b = 0; b < pp.batch; ++b)
      for (Index h = 0; h < pp.heads; ++h)
        out.block(b * pp.n_q, h * pp.d_v, pp.n_q, pp.d_v) =
            reference::attention(data.q.block(b * pp.n_q, h * pp.d_k, pp.n_q, pp.d_k),
                                 data.k.block(b * pp.n_k, h * pp.d_k, pp.n_k, pp.d_k),
                                 data.v.block(b * pp.n_k, h * pp.d_v, pp.n_k, pp.d_v), scale,
                                 {false, pp.kv_shape().valid_length(b), 0});
    return out;
  };

  AttentionCore<LowRank<double>> dense(
      {.projection = {.k = 12, .n_max = 12}, .sharing = ProjectionSharing::none}, layout);
  for (Index h = 0; h < p.heads; ++h)
    for (const bool values : {false, true})
      dense.policy().projection(h, values).set_weight(Matrix<double>::Identity(12, 12));
  CHECK(reference::relative_error(run(dense, p, data.q, data.k, data.v), exact(p)) < 1e-13);

  // Windows of one token are the tokens themselves, padding included (they are masked).
  const Problem padded{2, 2, 12, 12, 4, 3, {12, 7}};
  AttentionCore<LowRank<double, MeanPooling>> mean({.projection = {.kernel = 1}}, layout);
  AttentionCore<LowRank<double, MaxPooling>> max({.projection = {.kernel = 1}}, layout);
  AttentionCore<LowRank<double, ConvProjection>> conv({.projection = {.kernel = 1}}, layout);
  for (const bool values : {false, true})
    conv.policy().projection(0, values).set_weight(Matrix<double>::Ones(1, 1));
  for (const Problem& pp : {p, padded}) {
    CAPTURE(pp.lengths);
    CHECK(reference::relative_error(run(mean, pp, data.q, data.k, data.v), exact(pp)) < 1e-13);
    CHECK(reference::relative_error(run(max, pp, data.q, data.k, data.v), exact(pp)) < 1e-13);
    CHECK(reference::relative_error(run(conv, pp, data.q, data.k, data.v), exact(pp)) < 1e-13);
  }
}

namespace {

// Keys and values constant over segments of `segment` tokens: attention of rank n/segment.
struct LowRankInputs {
  Matrix<double> q, k, v;
  MatD exact;
  LowRankInputs(Index n, Index d, Index segment, std::uint64_t seed) : q(n, d), k(n, d), v(n, d) {
    Matrix<double> ks(n / segment, d), vs(n / segment, d);
    CounterRng(seed, 1).fill_normal(q);
    CounterRng(seed, 2).fill_normal(ks, 1.5);
    CounterRng(seed, 3).fill_normal(vs);
    for (Index j = 0; j < n; ++j) {
      k.row(j) = ks.row(j / segment);
      v.row(j) = vs.row(j / segment);
    }
    exact = reference::attention(q, k, v, 1.0 / std::sqrt(double(d)), {});
  }
};

// Adam on every parameter the policy visits, minimising ‖out − exact‖ / ‖exact‖.
template <class Policy>
double train_to(Policy& policy, const LowRankInputs& in, int steps, double rate) {
  const Index n = in.q.rows(), d = in.q.cols();
  Workspace ws;
  ws.reserve(policy.scratch_bytes(n, n, d, d));
  auto saved = policy.make_saved(n, n);
  Matrix<double> out(n, d), dq(n, d), dk(n, d), dv(n, d);
  const HeadContext ctx{0, 0, 0, n, 0, false};
  std::map<std::string, std::pair<MatD, MatD>> moments;
  for (int step = 1; step <= steps; ++step) {
    policy.forward(in.q, in.k, in.v, out, &saved, ctx, ws);
    const Matrix<double> d_out = (out - in.exact) / in.exact.norm();
    policy.zero_grad();
    policy.backward(in.q, in.k, in.v, out, d_out, saved, dq, dk, dv, ctx, ws);
    policy.visit_parameters([&](std::string_view name, Matrix<double>& w, Matrix<double>& g) {
      auto& [m, s] = moments[std::string(name)];
      if (m.size() == 0) m = s = MatD::Zero(w.rows(), w.cols());
      m = 0.9 * m + 0.1 * g;
      s = 0.999 * s + 0.001 * g.cwiseAbs2();
      const double c1 = 1 - std::pow(0.9, step), c2 = 1 - std::pow(0.999, step);
      w.array() -= rate * (m.array() / c1) / ((s.array() / c2).sqrt() + 1e-8);
    });
  }
  policy.forward(in.q, in.k, in.v, out, nullptr, ctx, ws);
  return reference::relative_error(out, in.exact);
}

}  // namespace

TEST_CASE("LowRank on low-rank attention: the error falls as k grows", "[lowrank][approximation]") {
  // Pooling: windows within a segment are exact, wider ones average distinct keys.
  const Index n = 256, d = 16;
  const LowRankInputs in(n, d, 16, 1);
  double previous = std::numeric_limits<double>::infinity();
  for (const Index kernel : {128, 64, 32, 16}) {
    const LowRank<double, MeanPooling> policy({.projection = {.kernel = kernel}},
                                              HeadLayout{1, d, d, 1});
    Workspace ws;
    ws.reserve(policy.scratch_bytes(n, n, d, d));
    Matrix<double> out(n, d);
    policy.forward(in.q, in.k, in.v, out, nullptr, HeadContext{0, 0, 0, n, 0, false}, ws);
    const double error = reference::relative_error(out, in.exact);
    CAPTURE(kernel, error);
    CHECK(error < previous);
    previous = error;
  }
  CHECK(previous < 1e-12);  // windows of one segment: exact

  // Dense projections are learned: after the same training, a larger k fits better
  // (mean over 4 seeds; measured 0.62, 0.53, 0.31, 0.03 for k = 2, 4, 8, 16).
  const LowRankInputs small(64, 8, 8, 1);
  previous = std::numeric_limits<double>::infinity();
  for (const Index k : {2, 4, 8, 16}) {
    double error = 0;
    for (std::uint64_t seed = 1; seed <= 4; ++seed) {
      LowRank<double> policy({.projection = {.k = k, .n_max = 64}}, HeadLayout{1, 8, 8, seed});
      error += train_to(policy, small, 600, 0.01) / 4;
    }
    CAPTURE(k, error);
    CHECK(error < previous);
    previous = error;
  }
  CHECK(previous < 0.1);
}

TEMPLATE_TEST_CASE("LowRank: padded keys and values have no influence", "[lowrank]",
                   Kind<DenseProjection>, Kind<MeanPooling>, Kind<MaxPooling>,
                   Kind<ConvProjection>) {
  using Policy = typename TestType::template Policy<double>;
  const Problem p{2, 2, 16, 16, 4, 4, {16, 9}};
  AttentionCore<Policy> core(TestType::template config<double>(ProjectionSharing::headwise),
                             HeadLayout{p.heads, p.d_k, p.d_v, 3});
  Data data(p);
  const Matrix<double> before = run(core, p, data.q, data.k, data.v);
  data.k.block(16 + 9, 0, 7, data.k.cols()).setConstant(50);
  data.v.block(16 + 9, 0, 7, data.v.cols()).setConstant(-50);
  CHECK(reference::relative_error(run(core, p, data.q, data.k, data.v), before) < 1e-14);
}

TEST_CASE("LowRank: sharing modes, layerwise sharing across layers, nonuniform k", "[lowrank]") {
  const HeadLayout layout{3, 4, 4, 1};
  using Policy = LowRank<float>;
  const Policy none({.projection = {.k = 4, .n_max = 16}, .sharing = ProjectionSharing::none},
                    layout);
  CHECK(&none.projection(0) != &none.projection(1));
  CHECK(&none.projection(0) != &none.projection(0, true));
  CHECK(none.projection(0).weight() != none.projection(1).weight());
  const Policy headwise({.projection = {.k = 4, .n_max = 16}}, layout);  // the default
  CHECK(&headwise.projection(0) == &headwise.projection(2));
  CHECK(&headwise.projection(0) != &headwise.projection(0, true));
  const Policy kv({.projection = {.k = 4, .n_max = 16}, .sharing = ProjectionSharing::key_value},
                  layout);
  CHECK(&kv.projection(0) == &kv.projection(2, true));
  CHECK(none.shared_projection() == nullptr);

  // A copy owns copies of its projections.
  Policy copy = headwise;
  CHECK(&copy.projection(0) != &headwise.projection(0));
  CHECK(copy.projection(0).weight() == headwise.projection(0).weight());

  // Layerwise: the first layer makes the projection, the second is handed it.
  using Block = MultiHeadAttention<LowRank<double>>;
  Block first(
      {.d_model = 6,
       .heads = 2,
       .seed = 1,
       .policy = {.projection = {.k = 3, .n_max = 8}, .sharing = ProjectionSharing::layerwise}});
  Block second({.d_model = 6,
                .heads = 2,
                .seed = 2,
                .policy = {.projection = {.k = 3, .n_max = 8},
                           .sharing = ProjectionSharing::layerwise,
                           .shared = first.policy().shared_projection()}});
  CHECK(&second.policy().projection(1, true) == &first.policy().projection(0));
  std::vector<std::string> first_names, second_names;
  first.visit_parameters([&](std::string_view n, auto&, auto&) { first_names.emplace_back(n); });
  second.visit_parameters([&](std::string_view n, auto&, auto&) { second_names.emplace_back(n); });
  CHECK(std::count(first_names.begin(), first_names.end(), "E") == 1);
  CHECK(std::count(second_names.begin(), second_names.end(), "E") == 0);

  // Gradients through both layers reach the shared E: y = second(first(x)).
  const SequenceShape shape{2, 7, {7, 5}};
  Matrix<double> x(14, 6), g(14, 6), h(14, 6), y(14, 6), dh(14, 6), dx(14, 6);
  CounterRng(1).fill_normal(x);
  CounterRng(2).fill_normal(g);
  shape.zero_padding(g);  // padded rows are not part of the loss
  auto loss = [&] {
    first.forward(x, h, shape);
    second.forward(h, y, shape);
    return y.cwiseProduct(g).sum();
  };
  std::map<std::string, MatD> numeric;
  first.visit_parameters([&](std::string_view name, Matrix<double>& value, auto&) {
    numeric["first." + std::string(name)] = reference::numeric_gradient(loss, value);
  });
  second.visit_parameters([&](std::string_view name, Matrix<double>& value, auto&) {
    numeric["second." + std::string(name)] = reference::numeric_gradient(loss, value);
  });
  const MatD numeric_x = reference::numeric_gradient(loss, x);
  first.set_training(true);
  second.set_training(true);
  first.forward(x, h, shape);
  second.forward(h, y, shape);
  first.zero_grad();
  second.zero_grad();
  second.backward(h, g, dh, shape);
  first.backward(x, dh, dx, shape);
  CHECK(reference::gradient_error(dx, numeric_x) < 1e-7);
  first.visit_parameters([&](std::string_view name, auto&, Matrix<double>& gradient) {
    CAPTURE(std::string(name));
    CHECK(reference::gradient_error(gradient, numeric.at("first." + std::string(name))) < 1e-7);
  });
  second.visit_parameters([&](std::string_view name, auto&, Matrix<double>& gradient) {
    CAPTURE(std::string(name));
    CHECK(reference::gradient_error(gradient, numeric.at("second." + std::string(name))) < 1e-7);
  });

  // Nonuniform k: each layer its own.
  MultiHeadAttention<LowRank<float>> narrow(
      {.d_model = 8, .heads = 2, .policy = {.projection = {.k = 2, .n_max = 16}}}),
      wide({.d_model = 8, .heads = 2, .policy = {.projection = {.k = 12, .n_max = 16}}});
  CHECK(narrow.policy().projection(0).weight().rows() == 2);
  CHECK(wide.policy().projection(0).weight().rows() == 12);
  Matrix<float> xf(16, 8), yf(16, 8), zf(16, 8);
  CounterRng(3).fill_normal(xf);
  narrow.forward(xf, yf, {1, 16});
  wide.forward(yf, zf, {1, 16});
  CHECK(zf.allFinite());
}

TEST_CASE("LowRank: bad configuration and input give effattn::Error", "[lowrank][errors]") {
  const HeadLayout layout{2, 4, 4, 0};
  using Dense = LowRank<float>;
  using Mean = LowRank<float, MeanPooling>;
  using Conv = LowRank<float, ConvProjection>;
  CHECK_THROWS_WITH(Dense({.projection = {.k = 0, .n_max = 16}}, layout),
                    Catch::Contains("DenseProjection") && Catch::Contains("'k' is 0"));
  CHECK_THROWS_WITH(Dense({.projection = {.k = 17, .n_max = 16}}, layout),
                    Catch::Contains("'k' is 17") && Catch::Contains("n_max = 16"));
  CHECK_THROWS_WITH(Mean({.projection = {.kernel = 0}}, layout), Catch::Contains("'kernel' is 0"));
  CHECK_THROWS_WITH(Conv({.projection = {.kernel = -2}}, layout),
                    Catch::Contains("'kernel' is -2"));

  const Dense dense({.projection = {.k = 4, .n_max = 16}}, layout);
  CHECK_NOTHROW(dense.validate(20, 16, 4, 4, false));
  CHECK_THROWS_WITH(dense.validate(20, 17, 4, 4, false), Catch::Contains("LowRank") &&
                                                             Catch::Contains("'n' is 17") &&
                                                             Catch::Contains("at most n_max = 16"));
  CHECK_THROWS_WITH(dense.validate(16, 16, 4, 4, true), Catch::Contains("mix all positions"));
  CHECK_THROWS_WITH(dense.validate(16, 16, 5, 4, false), Catch::Contains("'d_k' is 5"));
  const LowRank<float, MaxPooling> pool({.projection = {.kernel = 4}}, layout);
  CHECK_NOTHROW(pool.validate(5, 12, 4, 4, false));
  CHECK_THROWS_WITH(pool.validate(5, 10, 4, 4, false), Catch::Contains("'n' is 10") &&
                                                           Catch::Contains("multiple of") &&
                                                           Catch::Contains("kernel (4)"));

  // Shared projections only with layerwise sharing, and only of this layer's shape.
  const Dense maker({.projection = {.k = 4, .n_max = 16}, .sharing = ProjectionSharing::layerwise},
                    layout);
  CHECK_THROWS_WITH(Dense({.projection = {.k = 4, .n_max = 16},
                           .sharing = ProjectionSharing::headwise,
                           .shared = maker.shared_projection()},
                          layout),
                    Catch::Contains("'shared'") && Catch::Contains("layerwise"));
  CHECK_THROWS_WITH(Dense({.projection = {.k = 5, .n_max = 16},
                           .sharing = ProjectionSharing::layerwise,
                           .shared = maker.shared_projection()},
                          layout),
                    Catch::Contains("k = 4") && Catch::Contains("this layer's k = 5"));
  Dense defaults({}, layout);
  CHECK_THROWS_WITH(defaults.projection(0).set_weight(Matrix<float>(3, 3)),
                    Catch::Contains("k × n_max = 256×4096"));

  // Through the block: a sequence longer than n_max is rejected before anything is written.
  MultiHeadAttention<Dense> block(
      {.d_model = 8, .heads = 2, .policy = {.projection = {.k = 4, .n_max = 16}}});
  Matrix<float> x(17, 8), y(17, 8);
  x.setOnes();
  y.setZero();
  CHECK_THROWS_WITH(block.forward(x, y, {1, 17}), Catch::Contains("at most n_max = 16"));
  CHECK(y.isZero());
}

TEMPLATE_TEST_CASE("LowRank gradients: the same bits on every call and every thread count",
                   "[lowrank][determinism]", (LowRank<float, DenseProjection>),
                   (LowRank<float, ConvProjection>)) {
  // Learned projections are shared by every (sequence, head) problem of a call, which add to
  // their gradients in a fixed order (blocks of columns, or a projection, per task).
  using Policy = TestType;
  for (const auto sharing :
       {ProjectionSharing::headwise, ProjectionSharing::layerwise, ProjectionSharing::none}) {
    CAPTURE(int(sharing), max_threads());
    typename Policy::Config policy;
    policy.sharing = sharing;
    if constexpr (requires { policy.projection.n_max; })
      policy.projection = {.k = 16, .n_max = 64};
    else
      policy.projection = {.kernel = 4};
    MultiHeadAttention<Policy> block({.d_model = 32, .heads = 4, .seed = 1, .policy = policy});
    const SequenceShape shape{6, 64, {64, 50, 64, 33, 64, 64}};
    Matrix<float> x(shape.tokens(), 32), dy(shape.tokens(), 32), y(shape.tokens(), 32);
    CounterRng(1).fill_normal(x);
    CounterRng(2).fill_normal(dy);
    auto run = [&] {
      Matrix<float> dx(shape.tokens(), 32);
      block.zero_grad();
      block.set_training(true);
      block.forward(x, y, shape);
      block.backward(x, dy, dx, shape);
      std::vector<Matrix<float>> grads{dx};
      block.visit_parameters(
          [&](std::string_view, auto&, Matrix<float>& g) { grads.push_back(g); });
      return grads;
    };
    const auto first = run();
    for (int repeat = 0; repeat < 3; ++repeat) {
      const auto again = run();
      REQUIRE(again.size() == first.size());
      for (std::size_t i = 0; i < first.size(); ++i)
        CHECK(again[i] == first[i]);  // bitwise
    }
#ifdef _OPENMP
    // Another thread count too: bitwise.
    const int threads = omp_get_max_threads();
    for (const int other : {1, 3}) {
      omp_set_num_threads(other);
      const auto serial = run();
      for (std::size_t i = 0; i < first.size(); ++i)
        CHECK(serial[i] == first[i]);
    }
    omp_set_num_threads(threads);
#endif
  }
}

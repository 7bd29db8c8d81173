// Writing an attention policy outside the library: dilated local attention, in which each row
// sees `span` keys spaced `dilation` apart (Longformer's dilated sliding window, or a strided head
// of the Sparse Transformer), with its backward; then used in a multi-head block like any other.
//
// The protocol is effattn/attention/attention_policy.hpp: this policy has only its required
// parts. The program checks the policy against exact attention (with span ≥ n and dilation 1 the
// two are the same function), checks its gradients against finite differences, and times it
// against exact attention at n = 4096. It returns 1 if a check fails.
#include <effattn/effattn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>

namespace {
using effattn::ConstView;
using effattn::HeadContext;
using effattn::HeadLayout;
using effattn::Index;
using effattn::View;
using effattn::Workspace;

template <class S>
class DilatedAttention {
 public:
  using Scalar = S;
  static constexpr std::string_view name = "dilated";
  static constexpr bool supports_causal = true;  // Causal: the keys p, p − δ, p − 2δ, …
  static constexpr bool supports_cross_attention = true;  // positions follow HeadContext
  static constexpr bool splits_queries = false;           // forward gets a head's whole queries

  struct Config {
    Index span = 16;     ///< keys a row sees at most
    Index dilation = 4;  ///< distance between them
  };
  /// What forward keeps for backward: each row's log-sum-exp (backward recomputes the rest).
  struct Saved {
    Eigen::Matrix<S, Eigen::Dynamic, 1> lse;
    std::size_t bytes() const { return sizeof(S) * static_cast<std::size_t>(lse.size()); }
  };

  // Bad settings are an effattn::Error naming the policy, the setting, what it got and wants.
  DilatedAttention(Config config, HeadLayout /*layout*/) : config_(config) {
    require(config.span, "span");
    require(config.dilation, "dilation");
  }

  Saved make_saved(Index n_q, Index /*n_k*/) const {
    return {Eigen::Matrix<S, Eigen::Dynamic, 1>(n_q)};
  }
  /// One row's scores: span scalars from the thread's workspace (no allocation in the loops).
  std::size_t scratch_bytes(Index, Index, Index, Index) const {
    return Workspace::bytes_for<S>(config_.span) + Workspace::bytes_for<Index>(config_.span);
  }
  void validate(Index n_q, Index n_k, Index d_k, Index d_v, bool /*causal*/) const {
    for (auto [what, value] : {std::pair{"n_q", n_q}, {"n_k", n_k}, {"d_k", d_k}, {"d_v", d_v}})
      require(value, what);
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Saved* saved,
               const HeadContext& ctx, Workspace& ws) const {
    Workspace::Frame frame(ws);
    S* p = ws.take<S>(config_.span);
    Index* keys = ws.take<Index>(config_.span);
    const S scale = S(1) / std::sqrt(S(q.cols()));
    for (Index i = 0; i < q.rows(); ++i) {
      const Index n = keys_of(i, ctx, keys);
      S top = -std::numeric_limits<S>::infinity();
      for (Index r = 0; r < n; ++r)
        top = std::max(top, p[r] = scale * q.row(i).dot(k.row(keys[r])));
      S sum = 0;
      for (Index r = 0; r < n; ++r)
        sum += p[r] = std::exp(p[r] - top);
      out.row(i).setZero();
      for (Index r = 0; r < n; ++r)
        out.row(i) += (p[r] / sum) * v.row(keys[r]);
      // A row with no visible key (padding) outputs zeros and sends back no gradient.
      if (saved) saved->lse(i) = n > 0 ? top + std::log(sum) : S(0);
    }
  }

  // FlashAttention's backward, row by row: P = exp(s − lse), D = dO·O, dS = P ⊙ (dO·Vᵀ − D).
  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    Workspace::Frame frame(ws);
    Index* keys = ws.take<Index>(config_.span);
    const S scale = S(1) / std::sqrt(S(q.cols()));
    d_q.setZero();
    d_k.setZero();
    d_v.setZero();
    for (Index i = 0; i < q.rows(); ++i) {
      const Index n = keys_of(i, ctx, keys);
      const S d = d_out.row(i).dot(out.row(i));
      for (Index r = 0; r < n; ++r) {
        const Index j = keys[r];
        const S p = std::exp(scale * q.row(i).dot(k.row(j)) - saved.lse(i));
        d_v.row(j) += p * d_out.row(i);
        const S ds = p * (d_out.row(i).dot(v.row(j)) - d) * scale;
        d_q.row(i) += ds * k.row(j);
        d_k.row(j) += ds * q.row(i);
      }
    }
  }

 private:
  static void require(Index value, const char* what) {
    if (value < 1)
      throw effattn::Error("DilatedAttention", what, std::to_string(value), "at least 1");
  }

  // The keys row i sees, in `keys`: causal, p, p − δ, … back to p − (span − 1)·δ; otherwise
  // centred on p. HeadContext bounds them (padding, causality); returns how many.
  Index keys_of(Index i, const HeadContext& ctx, Index* keys) const {
    const Index p = ctx.position(i), first = ctx.causal ? p - (config_.span - 1) * config_.dilation
                                                        : p - config_.span / 2 * config_.dilation;
    Index n = 0;
    for (Index r = 0; r < config_.span; ++r) {
      const Index j = first + r * config_.dilation;
      if (j >= ctx.key_begin(i) && j < ctx.key_end(i)) keys[n++] = j;
    }
    return n;
  }

  Config config_;
};

// A block of either policy, its forward and its input gradient for dy = 1.
template <class Block>
std::pair<effattn::Matrix<typename Block::Scalar>, effattn::Matrix<typename Block::Scalar>> run(
    Block& block, const effattn::Matrix<typename Block::Scalar>& x,
    const effattn::SequenceShape& shape) {
  using S = typename Block::Scalar;
  effattn::Matrix<S> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  block.set_training(true);
  block.forward(x, y, shape);
  const effattn::Matrix<S> dy = effattn::Matrix<S>::Ones(x.rows(), x.cols());
  block.backward(x, dy, dx, shape);
  return {y, dx};
}

double relative(const auto& a, const auto& b) {
  return (a - b).norm() / std::max(b.norm(), 1e-300);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace effattn;
  bool ok = true;
  auto check = [&](bool pass, const char* what, double value) {
    std::printf("%-62s %.2e  %s\n", what, value, pass ? "ok" : "FAILED");
    ok = ok && pass;
  };

  // 1. With span ≥ n and dilation 1 every row sees every key it may: exact attention.
  {
    const SequenceShape shape{.batch = 2, .seq = 40, .lengths = {40, 23}};
    Matrix<double> x(shape.tokens(), 32);
    CounterRng(1).fill_normal(x);
    MultiHeadAttention<DilatedAttention<double>, Causal> dilated(
        {.d_model = 32, .heads = 4, .seed = 3, .policy = {.span = 40, .dilation = 1}});
    MultiHeadAttention<FullAttention<double>, Causal> exact({.d_model = 32, .heads = 4, .seed = 3});
    const auto [y, dx] = run(dilated, x, shape);
    const auto [y_exact, dx_exact] = run(exact, x, shape);
    auto valid = [&](const Matrix<double>& m) { return m.topRows(40 + 23).eval(); };
    check(relative(valid(y), valid(y_exact)) < 1e-12, "span >= n, dilation 1: output vs exact",
          relative(valid(y), valid(y_exact)));
    check(relative(valid(dx), valid(dx_exact)) < 1e-12, "span >= n, dilation 1: dx vs exact",
          relative(valid(dx), valid(dx_exact)));
  }

  // 2. Dilated, both maskings: the input gradient against central finite differences of the
  // loss sum(y), in double.
  auto finite_differences = [&](auto block, const char* what) {
    const SequenceShape shape{.batch = 1, .seq = 30};
    Matrix<double> x(30, 16);
    CounterRng(2).fill_normal(x);
    const auto [y, dx] = run(block, x, shape);
    double worst = 0;
    for (Index t : {0, 7, 15, 29})
      for (Index c : {0, 5, 15}) {
        Matrix<double> xp = x, xm = x, yp(30, 16), ym(30, 16);
        xp(t, c) += 1e-6;
        xm(t, c) -= 1e-6;
        block.forward(xp, yp, shape);
        block.forward(xm, ym, shape);
        const double numeric = (yp.sum() - ym.sum()) / 2e-6;
        worst = std::max(worst, std::abs(numeric - dx(t, c)) / std::max(1.0, std::abs(numeric)));
      }
    check(worst < 1e-6, what, worst);
  };
  finite_differences(MultiHeadAttention<DilatedAttention<double>, Causal>(
                         {.d_model = 16, .heads = 2, .seed = 5, .policy = {4, 3}}),
                     "span 4, dilation 3, causal: dx vs finite differences");
  finite_differences(MultiHeadAttention<DilatedAttention<double>, Bidirectional>(
                         {.d_model = 16, .heads = 2, .seed = 5, .policy = {5, 2}}),
                     "span 5, dilation 2, bidirectional: dx vs finite differences");

  // 3. The point of it: at n = 4096 a row attends to 64 keys instead of up to 4096 (the first
  // argument sets n: the sanitizer builds run a short one).
  {
    const Index n = argc > 1 ? std::atol(argv[1]) : 4096;
    const SequenceShape shape{.batch = 1, .seq = n};
    Matrix<float> x(shape.tokens(), 256), y(shape.tokens(), 256);
    CounterRng(4).fill_normal(x);
    MultiHeadAttention<DilatedAttention<float>, Causal> dilated(
        {.d_model = 256, .heads = 4, .policy = {.span = 64, .dilation = 8}});
    MultiHeadAttention<FullAttention<float>, Causal> exact({.d_model = 256, .heads = 4});
    auto seconds = [&](auto& block) {
      block.forward(x, y, shape);  // warm-up
      const auto t0 = std::chrono::steady_clock::now();
      block.forward(x, y, shape);
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    const double t_dilated = seconds(dilated), t_exact = seconds(exact);
    std::printf(
        "n = %ld, 4 heads of 64, causal forward: dilated (64 keys, every 8th) %.1f ms, "
        "exact %.1f ms\n",
        static_cast<long>(n), 1e3 * t_dilated, 1e3 * t_exact);
    ok = ok && y.allFinite();
  }
  return ok ? 0 : 1;
}

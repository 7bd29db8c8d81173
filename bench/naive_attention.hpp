#pragma once
// NaiveAttention: the textbook algorithm, materialising the n_q × n_k score matrix.
// A baseline for the benchmarks only (the library itself never holds an n² buffer):
// it is an AttentionPolicy, so it runs through the same AttentionCore as the real policies
// and the comparison is one harness, one thread pool, one run.

#include <cmath>
#include <limits>

#include <effattn/effattn.hpp>

namespace effattn::bench {

template <class S = float>
class NaiveAttention {
 public:
  using Scalar = S;
  static constexpr const char* name = "naive";
  static constexpr bool supports_causal = true;
  static constexpr bool supports_cross_attention = true;
  static constexpr bool splits_queries = true;
  struct Config {};
  struct Saved {
    std::size_t bytes() const { return 0; }
  };

  NaiveAttention(Config, HeadLayout) {}
  Saved make_saved(Index, Index) const { return {}; }
  void validate(Index, Index, Index, Index, bool) const {}
  std::size_t scratch_bytes(Index n_q, Index n_k, Index, Index) const {
    return 2 * Workspace::bytes_for<S>(n_q * n_k);
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Saved*,
               const HeadContext& ctx, Workspace& ws) const {
    Workspace::Frame frame(ws);
    auto p = scores(q, k, ctx, ws);
    out.noalias() = p * v;
  }

  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved&, View<S> dq, View<S> dk, View<S> dv,
                const HeadContext& ctx, Workspace& ws) const {
    Workspace::Frame frame(ws);
    const S s = S(1) / std::sqrt(S(q.cols()));
    auto p = scores(q, k, ctx, ws);
    auto dp = ws.matrix<S>(q.rows(), k.rows());
    dv.noalias() = p.transpose() * d_out;
    dp.noalias() = d_out * v.transpose();
    for (Index i = 0; i < p.rows(); ++i)
      dp.row(i) =
          p.row(i).cwiseProduct((dp.row(i).array() - d_out.row(i).dot(out.row(i))).matrix());
    dq.noalias() = s * dp * k;
    dk.noalias() = s * dp.transpose() * q;
  }

 private:
  // P = softmax(s·q kᵀ + mask), every row at once.
  static auto scores(ConstView<S> q, ConstView<S> k, const HeadContext& ctx, Workspace& ws) {
    const S s = S(1) / std::sqrt(S(q.cols()));
    auto p = ws.matrix<S>(q.rows(), k.rows());
    p.noalias() = s * q * k.transpose();
    for (Index i = 0; i < p.rows(); ++i) {
      const Index end = ctx.key_end(i);
      p.row(i).tail(p.cols() - end).setConstant(-std::numeric_limits<S>::infinity());
      if (end == 0) {
        p.row(i).setZero();
        continue;
      }
      p.row(i) = (p.row(i).array() - p.row(i).maxCoeff()).exp().matrix();
      p.row(i) /= p.row(i).sum();
    }
    return p;
  }
};

static_assert(AttentionPolicy<NaiveAttention<float>>);

}  // namespace effattn::bench

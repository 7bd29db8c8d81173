#pragma once
// Naive references for the tests: double precision, every matrix materialised, written
// for obviousness rather than speed. Nothing here is used by the library.

#include <Eigen/Core>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <type_traits>

#include "effattn/attention/feature_maps/hyperbolic_softmax_features.hpp"
#include "effattn/attention/feature_maps/positive_softmax_features.hpp"
#include "effattn/attention/feature_maps/relu_features.hpp"
#include "effattn/attention/feature_maps/trigonometric_features.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"

namespace effattn::reference {

using MatD = Eigen::MatrixXd;
using VecD = Eigen::VectorXd;

/// Which keys a query sees: the rule of effattn::HeadContext, restated independently.
struct Mask {
  bool causal = false;
  Index key_length = -1;   ///< -1: every key
  Index causal_shift = 0;  ///< query i sits at key position i + causal_shift
  Index before = -1;       ///< a window: keys at most `before` positions earlier; -1: any
  Index after = -1;        ///< and at most `after` later; -1: any

  bool visible(Index i, Index j, Index n_k) const {
    const Index length = key_length < 0 ? n_k : key_length, p = i + causal_shift;
    if (j >= length) return false;
    if (causal && j > p) return false;
    if (before >= 0 && j < p - before) return false;
    return after < 0 || j <= p + after;
  }
};

/// Score modifiers, restated from their papers: the logit x = scale · q·k becomes
/// cap·tanh(x / cap) (when cap > 0), then gets −slope·|p − j| added (ALiBi, when slope > 0), p
/// the query's key position (i + causal_shift).
struct Scores {
  double slope = 0;
  double cap = 0;
  double logit(double x, Index p, Index j) const {
    if (cap > 0) x = cap * std::tanh(x / cap);
    return x - slope * double(std::abs(p - j));
  }
  /// d logit / d x.
  double slope_of(double x) const {
    if (cap == 0) return 1;
    const double t = std::tanh(x / cap);
    return 1 - t * t;
  }
};

/// softmax of the (modified) scaled logits with masked entries removed; a row with no visible
/// key is all 0.
inline MatD probabilities(const MatD& q, const MatD& k, double scale, const Mask& mask,
                          const Scores& scores = {}) {
  const Index n_q = q.rows(), n_k = k.rows();
  MatD p = MatD::Zero(n_q, n_k);
  const auto logit = [&](Index i, Index j) {
    return scores.logit(scale * q.row(i).dot(k.row(j)), i + mask.causal_shift, j);
  };
  for (Index i = 0; i < n_q; ++i) {
    double max = -std::numeric_limits<double>::infinity();
    for (Index j = 0; j < n_k; ++j)
      if (mask.visible(i, j, n_k)) max = std::max(max, logit(i, j));
    if (max == -std::numeric_limits<double>::infinity()) continue;
    double sum = 0;
    for (Index j = 0; j < n_k; ++j)
      if (mask.visible(i, j, n_k)) sum += p(i, j) = std::exp(logit(i, j) - max);
    p.row(i) /= sum;
  }
  return p;
}

inline MatD attention(const MatD& q, const MatD& k, const MatD& v, double scale, const Mask& mask,
                      const Scores& scores = {}) {
  return probabilities(q, k, scale, mask, scores) * v;
}

struct AttentionGrads {
  MatD dq, dk, dv;
};

/// Analytic gradients of attention through the materialised probability matrix.
inline AttentionGrads attention_backward(const MatD& q, const MatD& k, const MatD& v,
                                         const MatD& d_out, double scale, const Mask& mask,
                                         const Scores& scores = {}) {
  const MatD p = probabilities(q, k, scale, mask, scores);
  const MatD dp = d_out * v.transpose();
  MatD ds = p.cwiseProduct(dp);
  const VecD row = ds.rowwise().sum();
  ds -= p.cwiseProduct(row.replicate(1, p.cols()));
  for (Index i = 0; i < ds.rows(); ++i)  // through the modifiers (ALiBi's bias has slope 1)
    for (Index j = 0; j < ds.cols(); ++j)
      ds(i, j) *= scores.slope_of(scale * q.row(i).dot(k.row(j)));
  return {scale * ds * k, scale * ds.transpose() * q, p.transpose() * d_out};
}

/// Central finite differences of a scalar function f with respect to every entry of x.
template <class M>
MatD numeric_gradient(const std::function<double()>& f, M& x, double h = 1e-6) {
  MatD g(x.rows(), x.cols());
  for (Index r = 0; r < x.rows(); ++r)
    for (Index c = 0; c < x.cols(); ++c) {
      const auto saved = x(r, c);
      x(r, c) = saved + h;
      const double up = f();
      x(r, c) = saved - h;
      const double down = f();
      x(r, c) = saved;
      g(r, c) = (up - down) / (2 * h);
    }
  return g;
}

/// ‖a − b‖_F / max(‖b‖_F, tiny): the error measure of every exact-path test.
template <class A, class B>
double relative_error(const A& a, const B& b) {
  const MatD ad = a.template cast<double>(), bd = b.template cast<double>();
  return (ad - bd).norm() / std::max(bd.norm(), 1e-300);
}

/// Error of an analytic gradient against a numeric one: relative where the gradient is
/// large, absolute below norm 1 (a gradient that is 0 in exact arithmetic, such as a key
/// bias under softmax's shift invariance, has no meaningful relative error).
template <class A, class B>
double gradient_error(const A& a, const B& b) {
  const MatD ad = a.template cast<double>(), bd = b.template cast<double>();
  return (ad - bd).norm() / std::max(bd.norm(), 1.0);
}

/// Multi-head attention (ALGORITHMS.md §7) with named weights as MultiHeadAttention has them.
struct MhaWeights {
  MatD w_q, w_k, w_v, w_o;
  VecD b_q, b_k, b_v, b_o;  // empty when the block has no bias
};

// RoPE from its definition: in each head, column i < dims/2 and column i + dims/2 of the row of
// the token at position p turn by the angle p·base^(−2i/dims) (self-attention: position = row).
inline void rotate_positions(MatD& m, Index heads, Index d, Index seq, double base, Index dims) {
  for (Index r = 0; r < m.rows(); ++r)
    for (Index h = 0; h < heads; ++h)
      for (Index i = 0; i < dims / 2; ++i) {
        const double angle = double(r % seq) * std::pow(base, -2.0 * double(i) / double(dims));
        const double a = m(r, h * d + i), b = m(r, h * d + i + dims / 2);
        m(r, h * d + i) = a * std::cos(angle) - b * std::sin(angle);
        m(r, h * d + i + dims / 2) = a * std::sin(angle) + b * std::cos(angle);
      }
}

// rotary_base > 0: queries and keys rotated (rotary_dims columns of each head, 0: all).
// kv_heads: key/value heads shared by groups of query heads (0: heads).
inline MatD multi_head_attention(const MatD& x, const MatD& context, const MhaWeights& w,
                                 Index heads, Index d_k, Index d_v, const SequenceShape& q_shape,
                                 const SequenceShape& kv_shape, bool causal, double scale,
                                 double rotary_base = 0, Index rotary_dims = 0,
                                 Index kv_heads = 0) {
  auto project = [](const MatD& in, const MatD& weight, const VecD& bias) {
    MatD out = in * weight;
    if (bias.size() > 0) out.rowwise() += bias.transpose();
    return out;
  };
  MatD q = project(x, w.w_q, w.b_q), k = project(context, w.w_k, w.b_k),
       v = project(context, w.w_v, w.b_v);
  const Index group = heads / (kv_heads == 0 ? heads : kv_heads);
  if (rotary_base > 0) {
    const Index dims = rotary_dims == 0 ? d_k : rotary_dims;
    rotate_positions(q, heads, d_k, q_shape.seq, rotary_base, dims);
    rotate_positions(k, heads / group, d_k, kv_shape.seq, rotary_base, dims);
  }
  // Padded rows attend and are attended to as zeros (core/sequence_shape.hpp).
  q_shape.zero_padding(q);
  kv_shape.zero_padding(k);
  kv_shape.zero_padding(v);
  const Index n_q = q_shape.seq, n_k = kv_shape.seq;
  MatD merged(x.rows(), heads * d_v);
  for (Index b = 0; b < q_shape.batch; ++b)
    for (Index h = 0; h < heads; ++h) {
      const Mask mask{causal, kv_shape.valid_length(b), n_k - n_q};
      merged.block(b * n_q, h * d_v, n_q, d_v) = attention(
          q.block(b * n_q, h * d_k, n_q, d_k), k.block(b * n_k, h / group * d_k, n_k, d_k),
          v.block(b * n_k, h / group * d_v, n_k, d_v), scale, mask);
    }
  return project(merged, w.w_o, w.b_o);
}

// φ(X) row by row, straight from ALGORITHMS.md §2, no stabiliser, in double.
template <class Map>
inline MatD naive_features(const MatD& x, const MatD& w) {
  const double scale = Map::estimates_softmax ? std::pow(double(x.cols()), -0.25) : 1.0;
  const MatD xs = scale * x, z = xs * w.transpose();
  const Index m = w.rows();
  MatD phi(x.rows(), Map::width * m);
  for (Index r = 0; r < x.rows(); ++r) {
    const double h = xs.row(r).squaredNorm() / 2;
    for (Index j = 0; j < m; ++j) {
      if constexpr (std::is_same_v<Map, PositiveSoftmaxFeatures>) {
        phi(r, j) = std::exp(z(r, j) - h) / std::sqrt(double(m));
      } else if constexpr (std::is_same_v<Map, HyperbolicSoftmaxFeatures>) {
        phi(r, j) = std::exp(z(r, j) - h) / std::sqrt(2.0 * m);
        phi(r, m + j) = std::exp(-z(r, j) - h) / std::sqrt(2.0 * m);
      } else if constexpr (std::is_same_v<Map, TrigonometricFeatures>) {
        phi(r, j) = std::exp(h) * std::sin(z(r, j)) / std::sqrt(double(m));
        phi(r, m + j) = std::exp(h) * std::cos(z(r, j)) / std::sqrt(double(m));
      } else {
        phi(r, j) = std::max(z(r, j), 0.0) / std::sqrt(double(m));
      }
    }
  }
  return phi;
}

// D⁻¹ (φ(Q) φ(K)ᵀ ∘ mask) V, materialised.
template <class Map>
inline MatD naive_favor(const MatD& q, const MatD& k, const MatD& v, const MatD& w,
                        const Mask& mask) {
  MatD a = naive_features<Map>(q, w) * naive_features<Map>(k, w).transpose();
  for (Index i = 0; i < a.rows(); ++i)
    for (Index j = 0; j < a.cols(); ++j)
      if (!mask.visible(i, j, a.cols())) a(i, j) = 0;
  MatD out = a * v;
  for (Index i = 0; i < a.rows(); ++i) {
    const double den = a.row(i).sum();
    out.row(i) = den == 0 ? Eigen::RowVectorXd::Zero(v.cols()).eval() : (out.row(i) / den).eval();
  }
  return out;
}

}  // namespace effattn::reference

#pragma once
// Random feature matrices for kernelised attention (Performer's FAVOR+, docs/algorithms.md §2).

#include <Eigen/QR>
#include <cmath>
#include <cstdint>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

/// How the directions of the rows w_1 … w_m are drawn.
enum class FeatureDirections {
  orthogonal,  ///< blocks of d exactly orthogonal rows (ORF): lower estimator variance
  iid,         ///< independent N(0, I) rows, for comparison
};

/// How orthogonal rows are scaled (IID rows keep their Gaussian lengths).
enum class FeatureNorms {
  regular,  ///< each row's length is that of an independent N(0, I_d) vector: rows are
            ///< marginally N(0, I), so every estimator built on them stays unbiased
  fixed,    ///< every row has length √d: lower variance still, but the softmax-kernel
            ///< estimate is then biased (it underestimates exp(x·y) for large x·y)
};

/// Draws W [m × d] for random features from (seed, stream).
/// Orthogonal: ⌈m/d⌉ blocks; each is the Q factor of the QR decomposition of a d×d standard
/// Gaussian matrix, with the sign fix Q ← Q·diag(sign(diag R)) that makes it Haar-distributed
/// (without it, Householder QR biases the signs), then rows scaled as `norms` says; the
/// first m rows are kept. QR runs in double whatever S is. Cost O(⌈m/d⌉·d³).
template <class S>
Matrix<S> draw_random_features(Index m, Index d, FeatureDirections directions, FeatureNorms norms,
                               const CounterRng& rng) {
  detail::require(m > 0, "draw_random_features", "m", m, "at least 1 feature");
  detail::require(d > 0, "draw_random_features", "d", d, "a head width of at least 1");
  Matrix<S> w(m, d);
  if (directions == FeatureDirections::iid) {
    rng.fill_normal(w);
    return w;
  }
  // Index layout of the stream: block b uses d·d Gaussians for its directions, then d·d more
  // for the d lengths of its rows (one d-vector each), so blocks never share numbers.
  const auto dd = static_cast<std::uint64_t>(d) * static_cast<std::uint64_t>(d);
  for (Index b = 0; b * d < m; ++b) {
    const std::uint64_t first = 2 * dd * static_cast<std::uint64_t>(b);
    Eigen::MatrixXd gaussian(d, d);
    rng.fill_normal(gaussian, 1.0, first);
    const Eigen::HouseholderQR<Eigen::MatrixXd> qr(gaussian);
    Eigen::MatrixXd q = qr.householderQ();
    const Eigen::MatrixXd& r = qr.matrixQR();  // R is its upper triangle
    for (Index c = 0; c < d; ++c)
      if (r(c, c) < 0) q.col(c) = -q.col(c);
    // Rows of the orthogonal Qᵀ are orthonormal directions.
    const Index rows = std::min(d, m - b * d);
    for (Index i = 0; i < rows; ++i) {
      double length = std::sqrt(double(d));
      if (norms == FeatureNorms::regular) {
        Eigen::RowVectorXd g(d);
        rng.fill_normal(g, 1.0, first + dd + static_cast<std::uint64_t>(i * d));
        length = g.norm();
      }
      w.row(b * d + i) = (length * q.col(i).transpose()).template cast<S>();
    }
  }
  return w;
}

}  // namespace effattn

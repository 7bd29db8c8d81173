#pragma once
// FeatureBlock: FAVOR+ features of a block of query or key rows, stabilised, and their backward.

#include <algorithm>
#include <cstddef>
#include <limits>

#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/core/packed_product.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail::favor {

/// The random directions W [m × d] of a call, packed once for both their products:
/// z = x·Wᵀ (features) and dx += dz·W (backward).
template <class S>
struct PackedDirections {
  typename Products<S>::Kept transposed, plain;

  /// Workspace the constructor takes.
  static std::size_t bytes(Index m, Index d) {
    return Products<S>::kept_bytes(d, m) + Products<S>::kept_bytes(m, d);
  }
  PackedDirections(const Products<S>& mul, Workspace& ws, const Matrix<S>& w)
      : transposed(mul.keep(ws, w.transpose())), plain(mul.keep(ws, w)) {}
};

/// How a block of rows is stabilised: `own`, each row by its own largest log-feature (kept
/// in shifts()); `common`, every row by one value at least as large as all of theirs.
enum class Shift { own, common };

/// Features of a block of rows (FAVOR+), with what backward needs: the scaled inputs and
/// projections.
template <class S, FeatureMap Map>
class FeatureBlock {
 public:
  /// Room for `capacity` rows of width d, with `features` random directions; inputs are
  /// multiplied by `input_scale` (d^{-1/4} for a map that estimates softmax) first. Products
  /// run through `products`, which must outlive the block.
  FeatureBlock(Workspace& ws, const Products<S>& products, Index capacity, Index d, Index features,
               S input_scale)
      : products_(&products),
        xs_(ws.matrix<S>(capacity, d)),
        z_(ws.matrix<S>(capacity, features)),
        phi_(ws.matrix<S>(capacity, Map::width * features)),
        shifts_(ws.take<S>(capacity)),
        capacity_(capacity),
        features_(features),
        input_scale_(input_scale) {}

  /// Features of `x` (rows of q or k) plus `epsilon`; rows at or past `valid` get zero
  /// features. Shift::common subtracts max(floor, the valid rows' largest log-feature),
  /// which it returns (−∞ when no row is valid).
  template <class X>
  S compute(const X& x, const PackedDirections<S>& w, Shift mode, S epsilon, Index valid = -1,
            S floor = -std::numeric_limits<S>::infinity()) {
    rows_ = x.rows();
    eigen_assert(rows_ <= capacity_);
    epsilon_ = epsilon;
    valid_ = valid < 0 ? rows_ : valid;
    const Index m = features_;
    xs().noalias() = input_scale_ * x;
    products_->assign(z(), xs(), w.transposed);
    S common = floor;
    for (Index r = 0; r < valid_; ++r) {
      shifts_[r] = Map::log_max(&z_(r, 0), m, half_norm(r));
      common = std::max(common, shifts_[r]);
    }
    for (Index r = 0; r < rows_; ++r) {
      if (r >= valid_) {
        phi().row(r).setZero();
        continue;
      }
      Map::apply(&z_(r, 0), m, half_norm(r), mode == Shift::own ? shifts_[r] : common, &phi_(r, 0));
      if (epsilon_ != S(0)) phi().row(r).array() += epsilon_;
    }
    return common;
  }

  /// dx (written) from d_phi for the rows of the last compute.
  template <class DP, class DX>
  void backward(DP& d_phi, const PackedDirections<S>& w, DX&& dx) {
    const Index m = features_;
    auto dz = z_.topRows(rows_);  // reused for dL/dz once the features are known
    for (Index r = 0; r < rows_; ++r) {
      if (r >= valid_) {
        dz.row(r).setZero();
        continue;
      }
      const S h = half_norm(r);
      phi().row(r).array() -= epsilon_;  // the maps' derivatives use φ without ε
      const S dh = Map::backward(&z_(r, 0), m, h, &phi_(r, 0), &d_phi(r, 0), &z_(r, 0));
      phi().row(r).array() += epsilon_;
      dx.row(r) = dh * xs().row(r);  // ∂h/∂x' = x'
    }
    products_->add(dx, dz, w.plain);
    dx *= input_scale_;
  }

  auto phi() { return phi_.topRows(rows_); }
  auto xs() { return xs_.topRows(rows_); }
  auto z() { return z_.topRows(rows_); }
  /// Own-shift rows: the shift of row r (valid rows only).
  S shift(Index r) const { return shifts_[r]; }
  const S* shifts() const { return shifts_; }
  Index rows() const { return rows_; }
  Index valid() const { return valid_; }

 private:
  S half_norm(Index r) { return xs().row(r).squaredNorm() / 2; }

  const Products<S>* products_;
  Eigen::Map<Matrix<S>, Eigen::Aligned64> xs_, z_, phi_;
  S* shifts_;
  Index capacity_, features_, rows_ = 0, valid_ = 0;
  S input_scale_;
  S epsilon_ = 0;
};

/// Divides each row of o by its normaliser; a row whose normaliser is 0 gives 0.
template <class O, class D>
void normalise(O& o, const D& den) {
  for (Index r = 0; r < o.rows(); ++r) {
    if (den(r) == typename O::Scalar(0))
      o.row(r).setZero();
    else
      o.row(r) /= den(r);
  }
}

}  // namespace effattn::detail::favor

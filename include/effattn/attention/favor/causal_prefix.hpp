#pragma once
// CausalPrefix: the running state of causal FAVOR+ (prefix sums of K'ᵀV and K') with a
// stabiliser that never looks ahead.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>

#include "effattn/core/finite.hpp"
#include "effattn/core/packed_product.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail::favor {

/// Causal prefix sums with a stabiliser that never looks ahead. Key j carries its own
/// shift s_j; query i uses r_i = max(shift of the state, s_j for the keys j ≤ i of its
/// chunk), so every factor below is exp(≤ 0) and no future key can make an earlier
/// feature underflow. The state (Σ K'ᵀV, Σ K') is kept in the frame of the largest shift
/// so far and rescaled when it grows. All shifts cancel in num/den: gradients treat them
/// as constants, which is exact because keys get no ε here.
/// The state of causal FAVOR+ between calls (incremental decoding): Σ φ(k)vᵀ and Σ φ(k)
/// (features × d_v, 1 × features) in the frame of `shift`, the largest key shift so far.
template <class S>
struct RecurrentState {
  Matrix<S> state, z;
  S shift = -std::numeric_limits<S>::infinity();
  Index length = 0;  ///< tokens in the state
  std::size_t bytes() const { return sizeof(S) * std::size_t(state.size() + z.size()); }
};

/// a ← a ⊕ b for sums of two stretches of keys, each in the frame of its shift (−∞: no key, the
/// values 0): forward sums (Σ K'ᵀV, Σ K') in the frame of the larger shift (largest), the keys'
/// gradient sums (Σ Q'ᵀ dnum, Σ Q'ᵀ dden) in the frame of the smaller, so every factor is ≤ 1.
/// Returns a's new shift. The one merge of FAVOR+'s sums: blocks of a head, shards of a sequence.
template <class S>
S combine_frames(S shift_a, S* a, S shift_b, const S* b, std::size_t length, bool largest) {
  constexpr S none = -std::numeric_limits<S>::infinity();
  if (shift_b == none) return shift_a;
  if (shift_a == none) {
    std::copy(b, b + length, a);
    return shift_b;
  }
  const S t = largest ? std::max(shift_a, shift_b) : std::min(shift_a, shift_b);
  const S fa = std::exp(largest ? shift_a - t : t - shift_a);
  const S fb = std::exp(largest ? shift_b - t : t - shift_b);
  for (std::size_t i = 0; i < length; ++i)
    a[i] = fa * a[i] + fb * b[i];
  return t;
}

/// The sums of a stretch of keys in one record: state (f × d_v), then z (1 × f), then the shift
/// of their frame (−∞: no key). Favor's blocks keep their prefix sums and the keys' gradient
/// sums in such records.
template <class S>
class KeySums {
 public:
  /// Scalars of one record, rounded up to 64 bytes.
  static Index scalars(Index f, Index dv) {
    constexpr Index line = Index(64 / sizeof(S));
    return (f * dv + f + 1 + line - 1) / line * line;
  }
  KeySums(S* record, Index f, Index dv) : p_(record), f_(f), dv_(dv) {}
  Eigen::Map<Matrix<S>> state() const { return {p_, f_, dv_}; }
  Eigen::Map<Matrix<S>> z() const { return {p_ + f_ * dv_, 1, f_}; }
  S& shift() const { return p_[f_ * dv_ + f_]; }
  /// No keys.
  void clear() const {
    std::fill(p_, p_ + values(), S(0));
    shift() = -std::numeric_limits<S>::infinity();
  }
  void assign(const KeySums& other) const { std::copy(other.p_, other.p_ + values() + 1, p_); }
  /// this ← this ⊕ other (combine_frames).
  void add(const KeySums& other, bool largest = true) const {
    shift() = combine_frames(shift(), p_, other.shift(), other.p_, std::size_t(values()), largest);
  }

 private:
  Index values() const { return f_ * dv_ + f_; }
  S* p_;
  Index f_, dv_;
};

template <class S>
class CausalPrefix {
 public:
  CausalPrefix(Workspace& ws, const Products<S>& products, Index capacity)
      : products_(&products),
        running_(ws.take<S>(capacity)),
        a_(ws.matrix<S>(capacity, capacity)),
        e_(ws.matrix<S>(capacity, capacity)) {}

  S shift() const { return shift_; }
  void restart(S shift) { shift_ = shift; }

  /// The chunk's weighted product A = tril(Q' K'ᵀ) ∘ E, E_ij = exp(s_j − r_i).
  template <class Block>
  auto enter(Block& qb, Block& kb) {
    rows_ = qb.rows();
    S r = shift_;
    using Row = Eigen::Map<const Eigen::Array<S, 1, Eigen::Dynamic>>;
    for (Index i = 0; i < rows_; ++i) {
      if (i < kb.valid()) r = std::max(r, kb.shift(i));
      running_[i] = r;
      const Index seen = std::min(i + 1, kb.valid());  // keys j ≤ i that are not padding
      e_.row(i).head(seen).array() = (Row(kb.shifts(), seen) - r).exp();
      e_.row(i).segment(seen, rows_ - seen).setZero();
    }
    next_ = rows_ > 0 ? running_[rows_ - 1] : shift_;
    valid_ = kb.valid();
    auto al = a_.topLeftCorner(rows_, rows_);
    products_->assign(al, qb.phi(), kb.phi().transpose());
    al.array() *= weights(rows_).array();
    // Selected, not multiplied: a later key's ∞ or NaN feature times its weight 0 would be NaN.
    for (Index i = 0; i < rows_; ++i)
      al.row(i).tail(rows_ - seen(i)).setZero();
    return al;
  }
  /// Keys of the chunk that query i sees: j ≤ i, and not padding.
  Index seen(Index i) const { return std::min(i + 1, valid_); }

  /// o += A·V over the keys each query sees: one product, or, when V holds a value that is not
  /// finite, row by row over the seen keys only (0 · NaN would reach earlier rows).
  template <class O, class A, class V>
  void add_seen(O&& o, const A& al, const V& v) const {
    if (all_finite(v)) {
      products_->add(o, al, v);
      return;
    }
    for (Index i = 0; i < rows_; ++i)
      o.row(i).noalias() += al.row(i).head(seen(i)) * v.topRows(seen(i));
  }
  auto weights(Index rows) const { return e_.topLeftCorner(rows, rows); }

  /// Rows times α_i = exp(state shift − r_i): the state's terms in query i's frame.
  template <class M>
  void scale_by_alpha(M&& m) const {
    for (Index i = 0; i < rows_; ++i)
      m.row(i) *= alpha(i);
  }
  template <class M1, class M2>
  void scale_by_alpha(M1&& a, M2&& b) const {
    scale_by_alpha(a);
    scale_by_alpha(b);
  }
  /// Key rows times β_j = exp(s_j − frame) (rows of padded keys are left as they are).
  template <class M, class Block>
  void scale_by_beta(M&& m, S frame, const Block& kb) const {
    for (Index j = 0; j < kb.valid(); ++j)
      m.row(j) *= std::exp(kb.shift(j) - frame);
  }

  /// Adds a chunk's keys to the state without queries (no enter), moving it to the frame of
  /// the largest shift so far.
  template <class Block, class V, class St, class Z>
  void add_keys(Block& kb, const V& v, St& state, Z& z) {
    next_ = shift_;
    for (Index j = 0; j < kb.valid(); ++j)
      next_ = std::max(next_, kb.shift(j));
    advance(kb, v, state, z);
  }

  /// Adds the chunk's keys to the state, moving it to the frame of the chunk's last shift.
  template <class Block, class V, class St, class Z>
  void advance(Block& kb, const V& v, St& state, Z& z) {
    if (shift_ != minus_infinity && next_ != shift_) {
      const S rescale = std::exp(shift_ - next_);
      state *= rescale;
      z *= rescale;
    }
    auto k = kb.phi();
    scale_by_beta(k, next_, kb);
    products_->add(state, k.transpose(), v);
    z.noalias() += k.colwise().sum();
    shift_ = next_;
  }

 private:
  static constexpr S minus_infinity = -std::numeric_limits<S>::infinity();

  S alpha(Index i) const {
    return shift_ == minus_infinity ? S(0) : std::exp(shift_ - running_[i]);
  }

  const Products<S>* products_;
  S* running_;
  Eigen::Map<Matrix<S>, Eigen::Aligned64> a_, e_;
  Index rows_ = 0, valid_ = 0;
  S shift_ = minus_infinity, next_ = minus_infinity;
};

}  // namespace effattn::detail::favor

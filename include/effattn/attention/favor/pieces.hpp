#pragma once
// Pieces: FAVOR+'s random directions, settings and the pieces of its bidirectional calls (key
// sums, queries against them), apart from Favor so that a sharded call (mpi::SequenceParallel)
// can run them with reductions across ranks in between; causal_pieces.hpp adds the causal
// sweeps.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "effattn/attention/favor/causal_prefix.hpp"
#include "effattn/attention/favor/feature_block.hpp"
#include "effattn/attention/favor/random_features.hpp"
#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/random_state.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/product.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail::favor {

/// Favor's base: its Config, W (drawn from the layout's seed, readable, settable) and the
/// pieces of its calls (see Favor for the algorithm).
template <class S, FeatureMap Map>
class Pieces {
 public:
  struct Config {
    Index features = 256;  ///< m, random directions
    FeatureDirections directions = FeatureDirections::orthogonal;
    FeatureNorms norms = FeatureNorms::regular;
    bool per_head = false;  ///< one W per head, or one shared by the heads of the layer
    /// Tokens per chunk (causal prefix sums, and feature blocks); 0: automatic, 64 causal and
    /// 128 bidirectional (the fastest measured on AVX-512 and AVX2 builds: causal chunks cost
    /// chunk² per chunk, bidirectional blocks only amortise their products).
    Index chunk = 0;
    std::optional<double> epsilon{};  ///< added to every feature; default the map's
  };

  Pieces(Config config, HeadLayout layout) : config_(config), layout_(layout) {
    constexpr const char* who = "Favor";
    detail::require(config_.features > 0, who, "features", config_.features,
                    "at least 1 random feature");
    detail::require(config_.chunk >= 0, who, "chunk", config_.chunk,
                    "a number of tokens (0 for automatic)");
    detail::require(layout_.d_key > 0 && layout_.heads > 0, who, "layout",
                    detail::concat(layout_.heads, " heads of width ", layout_.d_key),
                    "at least one head of width at least 1");
    epsilon_ = static_cast<S>(config_.epsilon.value_or(Map::default_epsilon));
    redraw(layout_.seed);
  }

  const Config& config() const { return config_; }
  /// Tokens per chunk in causal or bidirectional calls (Config::chunk, or its automatic value).
  Index chunk(bool causal) const { return config_.chunk > 0 ? config_.chunk : causal ? 64 : 128; }
  Index features() const { return config_.features; }
  /// Feature width: features() random directions, Map::width features each.
  Index feature_width() const { return Map::width * config_.features; }
  /// Number of W matrices: heads when per_head, else 1.
  Index projections() const { return static_cast<Index>(w_.size()); }
  const Matrix<S>& projection(Index head) const { return w_[index_of(head)]; }

  /// Replaces W of `head` (all heads share one when not per_head), e.g. to load weights.
  void set_projection(Index head, const Matrix<S>& w) {
    detail::require(w.rows() == config_.features && w.cols() == layout_.d_key, "Favor",
                    "projection", detail::concat("a ", w.rows(), "×", w.cols(), " matrix"),
                    detail::concat("features × d_key = ", config_.features, "×", layout_.d_key));
    w_[index_of(head)] = w;
  }

  /// W as a checkpoint holds it: "features" (shared by the heads) or "features.<h>" (per head).
  RandomState<S> random_state() const {
    RandomState<S> state;
    for (std::size_t i = 0; i < w_.size(); ++i)
      state.tensors.emplace_back(feature_name(i), w_[i]);
    return state;
  }
  bool claims_random_tensor(const std::string& name) const {
    return name == "features" || name.starts_with("features.");
  }
  /// Why `state` cannot be this Favor's W (other matrices, or other shapes), or "".
  std::string check_random_state(const RandomState<S>& state) const {
    if (state.tensors.size() != w_.size())
      return detail::concat(state.tensors.size(), " feature matrices where ", w_.size(),
                            w_.size() == 1 ? " is" : " are", " needed (",
                            config_.per_head ? "one per head" : "one for all heads", ")");
    for (std::size_t i = 0; i < w_.size(); ++i) {
      const Matrix<S>* w = find_features(state, i);
      if (!w) return detail::concat("no '", feature_name(i), "'");
      if (w->rows() != w_[i].rows() || w->cols() != w_[i].cols())
        return detail::concat("'", feature_name(i), "' of ", w->rows(), "×", w->cols(),
                              " for features × d_key = ", w_[i].rows(), "×", w_[i].cols());
    }
    return {};
  }
  /// Takes W from a state check_random_state accepts.
  void set_random_state(const RandomState<S>& state) {
    for (std::size_t i = 0; i < w_.size(); ++i)
      w_[i] = *find_features(state, i);
  }

  /// Draws every W anew from `seed` (training redraws every so many steps).
  void redraw(std::uint64_t seed) {
    w_.clear();
    const Index count = config_.per_head ? layout_.heads : 1;
    for (Index h = 0; h < count; ++h)
      w_.push_back(draw_random_features<S>(config_.features, layout_.d_key, config_.directions,
                                           config_.norms,
                                           CounterRng(seed, 0x4641564f52ull + std::uint64_t(h))));
  }

  // Pieces of a call. forward and backward are made of them; mpi::SequenceParallel runs them on
  // shards of a sequence and reduces the sums across ranks in between. State matrices are
  // feature_width() × d_v, z and r_z 1 × feature_width(), v_sum 1 × d_v.

  /// Bidirectional: state = Σ K'ᵀV, z = Σ K', v_sum = Σ V over the rows of k and v (all
  /// valid keys), under one common shift, the largest log-feature among them, which it
  /// returns (−∞ without rows). A chunk that raises the shift rescales what came before, so
  /// there is no separate pass over the keys. No ε (add_key_epsilon, once the sums are whole).
  S sum_keys(ConstView<S> k, ConstView<S> v, Index head, View<S> state, View<S> z, View<S> v_sum,
             Workspace& ws) const {
    state.setZero();
    z.setZero();
    v_sum.setZero();
    S shift = minus_infinity;
    if (k.rows() == 0) return shift;
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index c = chunk(false);
    const Products mul = products(ws, k.rows(), k.rows(), v.cols());
    const Directions w(mul, ws, projection(head));
    Block kb = block(ws, mul, std::min(c, k.rows()));
    for (Index j0 = 0; j0 < k.rows(); j0 += c) {
      const Index rows = std::min(c, k.rows() - j0);
      const S next = kb.compute(k.middleRows(j0, rows), w, Shift::common, S(0), -1, shift);
      if (j0 > 0 && next != shift) {
        const S rescale = std::exp(shift - next);
        state *= rescale;
        z *= rescale;
      }
      shift = next;
      mul.add(state, kb.phi().transpose(), v.middleRows(j0, rows));
      z.noalias() += kb.phi().colwise().sum();
      v_sum.noalias() += v.middleRows(j0, rows).colwise().sum();
    }
    return shift;
  }

  /// Adds ε to every key feature of whole sums over `count` keys (bidirectional).
  void add_key_epsilon(View<S> state, View<S> z, ConstView<S> v_sum, Index count) const {
    const S eps = key_epsilon(false);
    if (eps == S(0)) return;
    for (Index r = 0; r < state.rows(); ++r)  // (rowwise() += would make a temporary)
      state.row(r) += eps * v_sum.row(0);
    z.array() += eps * S(count);
  }

  /// Bidirectional: the output of the queries q from whole key sums.
  void attend(ConstView<S> q, ConstView<S> state, ConstView<S> z, View<S> out, Index head,
              Workspace& ws) const {
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index n_q = q.rows(), c = chunk(false);
    const Products mul = products(ws, n_q, n_q, out.cols());
    const Directions w(mul, ws, projection(head));
    Block qb = block(ws, mul, std::min(c, n_q));
    auto den = ws.matrix<S>(std::min(c, n_q), 1);
    const auto state_packed = mul.keep(ws, state);
    for (Index i0 = 0; i0 < n_q; i0 += c) {
      const Index rows = std::min(c, n_q - i0);
      qb.compute(q.middleRows(i0, rows), w, Shift::own, epsilon_);
      auto o = out.middleRows(i0, rows);
      mul.assign(o, qb.phi(), state_packed);
      auto dl = den.topRows(rows);
      dl.noalias() = qb.phi() * z.transpose();
      detail::favor::normalise(o, dl);
    }
  }

  /// Bidirectional backward, queries: d_q (written) from whole key sums, and the sums the keys'
  /// gradients need, r_state = Σ Q'ᵀ dnum and r_z = Σ Q'ᵀ dden over the rows of q (written).
  void query_gradients(ConstView<S> q, ConstView<S> out, ConstView<S> d_out, ConstView<S> state,
                       ConstView<S> z, Index head, View<S> d_q, View<S> r_state, View<S> r_z,
                       Workspace& ws) const {
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index n_q = q.rows(), dv = out.cols(), c = chunk(false);
    const Products mul = products(ws, n_q, n_q, dv);
    const Directions w(mul, ws, projection(head));
    Block qb = block(ws, mul, std::min(c, n_q));
    Rows g(ws, std::min(c, n_q), feature_width(), dv);
    r_state.setZero();
    r_z.setZero();
    const auto state_t = mul.keep(ws, state.transpose());
    for (Index i0 = 0; i0 < n_q; i0 += c) {
      const Index rows = std::min(c, n_q - i0);
      qb.compute(q.middleRows(i0, rows), w, Shift::own, epsilon_);
      auto dl = g.den.topRows(rows);
      dl.noalias() = qb.phi() * z.transpose();
      g.output_grads(out.middleRows(i0, rows), d_out.middleRows(i0, rows), dl);
      auto dp = g.d_phi.topRows(rows);
      mul.assign(dp, g.dnum.topRows(rows), state_t);
      dp.noalias() += g.dden.topRows(rows) * z;
      qb.backward(dp, w, d_q.middleRows(i0, rows));
      mul.add(r_state, qb.phi().transpose(), g.dnum.topRows(rows));
      r_z.noalias() += g.dden.topRows(rows).transpose() * qb.phi();
    }
  }

  /// Bidirectional backward, keys: d_k, d_v (written) of the rows of k, v (valid keys) from
  /// whole query sums; `shift` is the common shift of all the keys (sum_keys's, or the
  /// largest of the parts').
  void key_gradients(ConstView<S> k, ConstView<S> v, S shift, ConstView<S> r_state,
                     ConstView<S> r_z, Index head, View<S> d_k, View<S> d_v, Workspace& ws) const {
    if (k.rows() == 0) return;
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index c = chunk(false);
    const Products mul = products(ws, k.rows(), k.rows(), v.cols());
    const Directions w(mul, ws, projection(head));
    Block kb = block(ws, mul, std::min(c, k.rows()));
    auto d_phi = ws.matrix<S>(std::min(c, k.rows()), feature_width());
    // r_state is whole: packed once for both of its products with every key chunk.
    const auto r_state_t = mul.keep(ws, r_state.transpose());
    const auto r_state_packed = mul.keep(ws, r_state);
    for (Index j0 = 0; j0 < k.rows(); j0 += c) {
      const Index rows = std::min(c, k.rows() - j0);
      kb.compute(k.middleRows(j0, rows), w, Shift::common, key_epsilon(false), -1, shift);
      auto dp = d_phi.topRows(rows);
      mul.assign(dp, v.middleRows(j0, rows), r_state_t);
      dp.rowwise() += r_z.row(0);
      mul.assign(d_v.middleRows(j0, rows), kb.phi(), r_state_packed);
      kb.backward(dp, w, d_k.middleRows(j0, rows));
    }
  }

 protected:
  static constexpr S minus_infinity = -std::numeric_limits<S>::infinity();
  using Block = detail::favor::FeatureBlock<S, Map>;
  using Prefix = detail::favor::CausalPrefix<S>;
  using Shift = detail::favor::Shift;
  using Products = detail::Products<S>;
  using Directions = detail::favor::PackedDirections<S>;

  Index largest_chunk() const { return std::max(chunk(false), chunk(true)); }

  // Gradient rows of a chunk in the backward sweeps.
  struct Rows {
    Eigen::Map<Matrix<S>, Eigen::Aligned64> d_phi, dnum, dden, den;
    Rows(Workspace& ws, Index capacity, Index f, Index dv)
        : d_phi(ws.matrix<S>(capacity, f)),
          dnum(ws.matrix<S>(capacity, dv)),
          dden(ws.matrix<S>(capacity, 1)),
          den(ws.matrix<S>(capacity, 1)) {}
    // dnum = dout/den, dden = −(dout·out)/den for a chunk's rows given their normalisers.
    template <class N>
    void output_grads(ConstView<S> out, ConstView<S> d_out, const N& normaliser) {
      for (Index r = 0; r < out.rows(); ++r) {
        const S inv = normaliser(r) == S(0) ? S(0) : S(1) / normaliser(r);
        dnum.row(r) = inv * d_out.row(r);
        dden(r) = -inv * d_out.row(r).dot(out.row(r));
      }
    }
    // tril(dnum·Vᵀ + dden·1ᵀ) ∘ E: the loss's derivative by the chunk's weighted products.
    template <class L, class V>
    auto local(L& l, Index rows, const V& v_chunk, const Prefix& run, const Products& mul) {
      auto ll = l.topLeftCorner(rows, rows);
      mul.assign(ll, dnum.topRows(rows), v_chunk.transpose());
      ll.colwise() += dden.topRows(rows).col(0);
      ll.array() *= run.weights(rows).array();
      return ll;
    }
  };

  Block block(Workspace& ws, const Products& mul, Index capacity) const {
    return Block(ws, mul, capacity, layout_.d_key, config_.features, input_scale());
  }

  // The products' pack buffer covers every operand b of this policy: at most P × P with P the
  // largest of the feature width, the head widths and the chunk.
  Index product_extent(Index n_q, Index n_k, Index d_v) const {
    return std::max(
        {feature_width(), layout_.d_key, d_v, std::min(largest_chunk(), std::max(n_q, n_k))});
  }
  Products products(Workspace& ws, Index n_q, Index n_k, Index d_v) const {
    const Index p = product_extent(n_q, n_k, d_v);
    return Products(ws, Products::capacity(p, p));
  }

  // Causal keys get no ε from a stabilised map: their features are relative to their own
  // shift, so ε would change the function (queries' ε sits in their own frame, as upstream).
  S key_epsilon(bool causal) const { return causal && Map::estimates_softmax ? S(0) : epsilon_; }

  S input_scale() const {
    return Map::estimates_softmax ? static_cast<S>(std::pow(double(layout_.d_key), -0.25)) : S(1);
  }

  const Matrix<S>* find_features(const RandomState<S>& state, std::size_t i) const {
    for (const auto& [name, w] : state.tensors)
      if (name == feature_name(i)) return &w;
    return nullptr;
  }
  std::string feature_name(std::size_t i) const {
    return config_.per_head ? detail::concat("features.", i) : std::string("features");
  }
  std::size_t index_of(Index head) const {
    return static_cast<std::size_t>(config_.per_head ? head : 0);
  }

  Config config_;
  HeadLayout layout_;
  S epsilon_ = 0;
  std::vector<Matrix<S>> w_;
};

}  // namespace effattn::detail::favor

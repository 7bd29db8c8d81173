#pragma once
// Favor: Performer's FAVOR+ attention, linear in the sequence length.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "effattn/attention/attention_policy.hpp"
#include "effattn/attention/favor/causal_prefix.hpp"
#include "effattn/attention/favor/feature_block.hpp"
#include "effattn/attention/favor/random_features.hpp"
#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/attention/feature_maps/positive_softmax_features.hpp"
#include "effattn/attention/feature_maps/relu_features.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/product.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// FAVOR+ (Choromanski et al. 2021, ALGORITHMS.md §2): with q' = q·d^{-1/4}, k' = k·d^{-1/4}
/// and features Q' = φ(q'), K' = φ(k') from m random directions W [m × d_k],
///   bidirectional  out = diag(Q'(K'ᵀ1))⁻¹ · Q'(K'ᵀV)
///   causal         out_i = Q'_i S_i / (Q'_i · z_i),  S_i = Σ_{j≤i} K'_jᵀ V_j,  z_i = Σ_{j≤i} K'_j
/// never forming an n×n matrix. Causal runs in chunks of `chunk` tokens: a masked chunk ×
/// chunk product inside a chunk, the m×d_v state carried across chunks.
/// Time O(n·m·d); scratch O(chunk·m + chunk² + m·d_v) per thread (plus n_q scalars in causal
/// backward). Stabiliser (all shifts cancel in the normalisation): queries subtract their own
/// row's largest log-feature. Bidirectional keys share one shift, the largest log-feature of
/// all valid keys, found while summing them (a chunk that raises it rescales the sums so
/// far). Causal keys keep their own shifts and each query works in the frame of the largest
/// shift among the keys it sees, so a future key can never make an earlier output underflow.
/// Padded keys get all-zero features, so they leave numerator and denominator. ε
/// (Config::epsilon, default the map's) is added to every query feature, and to key features
/// except when causal with a stabilised map (there each key is in its own frame and ε would
/// change the function). A row whose normaliser is 0 gives 0. W is not trained; it is drawn
/// from the block's seed, redrawn on request and readable and settable. Queries and keys of a
/// head always share W.
template <class S = float, FeatureMap Features = PositiveSoftmaxFeatures>
class Favor {
 public:
  using Scalar = S;
  using Map = Features;  ///< the feature map φ
  static constexpr const char* name = "favor";
  static constexpr bool supports_causal = true;
  static constexpr bool supports_cross_attention = true;  // bidirectional only
  static constexpr bool splits_queries = false;           // keys are summarised per call

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
  struct Saved {
    std::size_t bytes() const { return 0; }  // everything is recomputed in backward
  };

  Favor() : Favor(Config{}, HeadLayout{}) {}
  Favor(Config config, HeadLayout layout) : config_(config), layout_(layout) {
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

  /// Draws every W anew from `seed` (training redraws every so many steps).
  void redraw(std::uint64_t seed) {
    w_.clear();
    const Index count = config_.per_head ? layout_.heads : 1;
    for (Index h = 0; h < count; ++h)
      w_.push_back(draw_random_features<S>(config_.features, layout_.d_key, config_.directions,
                                           config_.norms,
                                           CounterRng(seed, 0x4641564f52ull + std::uint64_t(h))));
  }

  Saved make_saved(Index, Index) const { return {}; }

  void validate(Index n_q, Index n_k, Index d_k, Index d_v, bool causal) const {
    constexpr const char* who = "Favor";
    detail::require(n_q > 0, who, "n_q", n_q, "at least 1 query");
    detail::require(n_k > 0, who, "n_k", n_k, "at least 1 key");
    detail::require(d_k == layout_.d_key, who, "d_k", d_k,
                    detail::concat("the width W was drawn for, ", layout_.d_key));
    detail::require(d_v > 0, who, "d_v", d_v, "a head width of at least 1");
    detail::require(!causal || n_q == n_k, who, "n_q", n_q,
                    detail::concat("n_k = ", n_k, ": causal FAVOR+ needs self-attention"));
  }

  std::size_t scratch_bytes(Index n_q, Index n_k, Index d_k, Index d_v) const {
    using W = Workspace;
    const Index c = std::min(largest_chunk(), std::max(n_q, n_k)), m = config_.features;
    const Index f = feature_width();
    const std::size_t chunk_buffers = 2 * W::bytes_for<S>(c * d_k) + 2 * W::bytes_for<S>(c * m) +
                                      4 * W::bytes_for<S>(c * f) + 3 * W::bytes_for<S>(c * c) +
                                      2 * W::bytes_for<S>(c * d_v) + 8 * W::bytes_for<S>(c);
    const std::size_t state =
        4 * W::bytes_for<S>(f * d_v) + 4 * W::bytes_for<S>(f) + W::bytes_for<S>(d_v);
    const Index p = product_extent(n_q, n_k, d_v);
    const Index shifts = n_q / std::min(chunk(false), chunk(true)) + 2;  // causal backward
    // W packed for the call; bidirectional states packed once complete (forward: the state;
    // backward: its transpose, then r_state and its transpose).
    const std::size_t kept = Directions::bytes(config_.features, d_k) +
                             2 * Products::kept_bytes(f, d_v) + 2 * Products::kept_bytes(d_v, f);
    return chunk_buffers + state + kept + W::bytes_for<S>(n_q) + W::bytes_for<S>(shifts) +
           Products::bytes(Products::capacity(p, p));
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Saved*,
               const HeadContext& ctx, Workspace& ws) const {
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index n_q = q.rows(), d_v = v.cols(), f = feature_width(), c = chunk(ctx.causal);
    const Index keys = ctx.key_length;
    out.setZero();
    if (keys == 0) return;
    const Products mul = products(ws, n_q, k.rows(), d_v);
    const Directions w(mul, ws, projection(ctx.head));
    // Blocks hold what a loop fills: query chunks, key chunks (causal: the query chunks).
    Block qb = block(ws, mul, std::min(c, n_q)), kb = block(ws, mul, std::min(c, k.rows()));
    auto state = ws.matrix<S>(f, d_v);  // Σ K'ᵀV
    auto z = ws.matrix<S>(1, f);        // Σ K'
    auto den = ws.matrix<S>(std::min(c, n_q), 1);
    state.setZero();
    z.setZero();
    if (!ctx.causal) {
      summarise_keys(k.topRows(keys), v.topRows(keys), w, kb, state, z, mul, ws);
      const auto state_packed = mul.keep(ws, state);  // fixed from here on
      for (Index i0 = 0; i0 < n_q; i0 += c) {
        const Index rows = std::min(c, n_q - i0);
        qb.compute(q.middleRows(i0, rows), w, Shift::own, epsilon_);
        auto o = out.middleRows(i0, rows);
        mul.assign(o, qb.phi(), state_packed);
        auto dl = den.topRows(rows);
        dl.noalias() = qb.phi() * z.transpose();
        detail::favor::normalise(o, dl);
      }
      return;
    }
    Prefix run(ws, mul, std::min(c, n_q));
    causal_chunks(q, k, v, out, keys, w, qb, kb, den, run, state, z, mul);
  }

  /// Incremental causal decoding in FAVOR+'s recurrent form: the state Σ φ(k)vᵀ and Σ φ(k)
  /// of the tokens decoded so far (in the frame of their largest stabiliser shift), O(m·d_v)
  /// per head whatever the prefix length. decode() runs the causal forward's chunk step on
  /// the new tokens from that state, so it equals the causal forward over the whole sequence
  /// up to rounding.
  using DecodeState = detail::favor::RecurrentState<S>;
  DecodeState decode_state(Index /*head*/, Index /*d_k*/, Index d_v) const {
    return {Matrix<S>::Zero(feature_width(), d_v), Matrix<S>::Zero(1, feature_width())};
  }
  std::size_t decode_scratch_bytes(Index m, Index /*length*/, Index d_k, Index d_v) const {
    return scratch_bytes(m, m, d_k, d_v);
  }
  void decode(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Index head,
              DecodeState& st, Workspace& ws) const {
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index n = q.rows(), d_v = v.cols(), c = chunk(true);
    const Products mul = products(ws, n, n, d_v);
    const Directions w(mul, ws, projection(head));
    Block qb = block(ws, mul, std::min(c, n)), kb = block(ws, mul, std::min(c, n));
    auto den = ws.matrix<S>(std::min(c, n), 1);
    Prefix run(ws, mul, std::min(c, n));
    run.restart(st.shift);
    causal_chunks(q, k, v, out, n, w, qb, kb, den, run, st.state, st.z, mul);
    st.shift = run.shift();
    st.length += n;
  }

  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved&, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index n_q = q.rows(), dv = v.cols(), f = feature_width(), c = chunk(ctx.causal);
    const Index keys = ctx.key_length;
    d_q.setZero();
    d_k.setZero();
    d_v.setZero();
    if (keys == 0) return;
    const Products mul = products(ws, n_q, k.rows(), dv);
    const Directions w(mul, ws, projection(ctx.head));
    Block qb = block(ws, mul, std::min(c, n_q)), kb = block(ws, mul, std::min(c, k.rows()));
    auto state = ws.matrix<S>(f, dv);
    auto z = ws.matrix<S>(1, f);
    auto r_state = ws.matrix<S>(f, dv);  // Σ Q'ᵀ dnum over the queries that see a key
    auto r_z = ws.matrix<S>(1, f);       // Σ Q'ᵀ dden
    auto d_phi = ws.matrix<S>(std::min(c, std::max(n_q, k.rows())), f);
    auto dnum = ws.matrix<S>(std::min(c, n_q), dv);
    auto dden = ws.matrix<S>(std::min(c, n_q), 1);
    auto den = ws.matrix<S>(std::min(c, n_q), 1);
    state.setZero();
    z.setZero();
    r_state.setZero();
    r_z.setZero();
    // dnum = dout/den, dden = −(dout·out)/den for rows [i0, i0+rows) given their normalisers.
    auto output_grads = [&](Index i0, Index rows, const auto& normaliser) {
      for (Index r = 0; r < rows; ++r) {
        const S inv = normaliser(r) == S(0) ? S(0) : S(1) / normaliser(r);
        dnum.row(r) = inv * d_out.row(i0 + r);
        dden(r) = -inv * d_out.row(i0 + r).dot(out.row(i0 + r));
      }
    };

    if (!ctx.causal) {
      const S shift = summarise_keys(k.topRows(keys), v.topRows(keys), w, kb, state, z, mul, ws);
      const auto state_t = mul.keep(ws, state.transpose());  // fixed from here on
      for (Index i0 = 0; i0 < n_q; i0 += c) {
        const Index rows = std::min(c, n_q - i0);
        qb.compute(q.middleRows(i0, rows), w, Shift::own, epsilon_);
        auto dl = den.topRows(rows);
        dl.noalias() = qb.phi() * z.transpose();
        output_grads(i0, rows, dl);
        auto dp = d_phi.topRows(rows);
        mul.assign(dp, dnum.topRows(rows), state_t);
        dp.noalias() += dden.topRows(rows) * z;
        qb.backward(dp, w, d_q.middleRows(i0, rows));
        mul.add(r_state, qb.phi().transpose(), dnum.topRows(rows));
        r_z.noalias() += dden.topRows(rows).transpose() * qb.phi();
      }
      // r_state is complete: packed once for both of its products with every key chunk.
      const auto r_state_t = mul.keep(ws, r_state.transpose());
      const auto r_state_packed = mul.keep(ws, r_state);
      for (Index j0 = 0; j0 < keys; j0 += c) {
        const Index rows = std::min(c, keys - j0);
        kb.compute(k.middleRows(j0, rows), w, Shift::common, key_epsilon(false), -1, shift);
        auto dp = d_phi.topRows(rows);
        mul.assign(dp, v.middleRows(j0, rows), r_state_t);
        dp.rowwise() += r_z.row(0);
        mul.assign(d_v.middleRows(j0, rows), kb.phi(), r_state_packed);
        kb.backward(dp, w, d_k.middleRows(j0, rows));
      }
      return;
    }

    // Causal. Forward sweep: the states before each chunk give dQ; each row's normaliser and
    // each chunk's state shift are kept (n_q + n_q/c scalars) for the reverse sweep, which
    // accumulates the Σ_{i ≥ j} terms for dK and dV in the frame of the chunk's shift.
    S* den_all = ws.take<S>(n_q);
    S* shifts = ws.take<S>(n_q / c + 2);  // shifts[t]: the state's shift before chunk t
    Prefix run(ws, mul, std::min(c, n_q));
    auto l = ws.matrix<S>(std::min(c, n_q), std::min(c, n_q));
    // tril(dnum·Vᵀ + dden·1ᵀ) ∘ E: the loss's derivative by the chunk's weighted products.
    auto local_grads = [&](Index rows, const auto& v_chunk) {
      auto ll = l.topLeftCorner(rows, rows);
      mul.assign(ll, dnum.topRows(rows), v_chunk.transpose());
      ll.colwise() += dden.topRows(rows).col(0);
      ll.array() *= run.weights(rows).array();
      return ll;
    };
    Index chunk_index = 0;
    for (Index t0 = 0; t0 < n_q; t0 += c, ++chunk_index) {
      const Index rows = std::min(c, n_q - t0);
      const Index valid = std::clamp<Index>(keys - t0, 0, rows);
      shifts[chunk_index] = run.shift();
      qb.compute(q.middleRows(t0, rows), w, Shift::own, epsilon_);
      kb.compute(k.middleRows(t0, rows), w, Shift::own, key_epsilon(true), valid);
      const auto al = run.enter(qb, kb);
      Eigen::Map<Eigen::Matrix<S, -1, 1>> den_chunk(den_all + t0, rows);
      den_chunk.noalias() = qb.phi() * z.transpose();
      run.scale_by_alpha(den_chunk);
      den_chunk += al.rowwise().sum();
      output_grads(t0, rows, den_chunk);
      auto ll = local_grads(rows, v.middleRows(t0, rows));
      auto dp = d_phi.topRows(rows);
      mul.assign(dp, dnum.topRows(rows), state.transpose());
      dp.noalias() += dden.topRows(rows) * z;
      run.scale_by_alpha(dp);
      mul.add(dp, ll, kb.phi());
      qb.backward(dp, w, d_q.middleRows(t0, rows));
      run.advance(kb, v.middleRows(t0, rows), state, z);
    }
    shifts[chunk_index] = run.shift();
    for (Index t0 = ((n_q - 1) / c) * c; t0 >= 0; t0 -= c) {
      --chunk_index;
      const Index rows = std::min(c, n_q - t0);
      const Index valid = std::clamp<Index>(keys - t0, 0, rows);
      const S before = shifts[chunk_index], after = shifts[chunk_index + 1];
      qb.compute(q.middleRows(t0, rows), w, Shift::own, epsilon_);
      kb.compute(k.middleRows(t0, rows), w, Shift::own, key_epsilon(true), valid);
      run.restart(before);
      const auto al = run.enter(qb, kb);
      output_grads(t0, rows, Eigen::Map<const Eigen::Matrix<S, -1, 1>>(den_all + t0, rows));
      auto ll = local_grads(rows, v.middleRows(t0, rows));
      // Later chunks' queries, through r_state and r_z (kept in the frame of `after`).
      auto dp = d_phi.topRows(rows);
      auto dvc = d_v.middleRows(t0, rows);
      mul.assign(dp, v.middleRows(t0, rows), r_state.transpose());
      dp.rowwise() += r_z.row(0);
      mul.assign(dvc, kb.phi(), r_state);
      run.scale_by_beta(dp, after, kb);
      run.scale_by_beta(dvc, after, kb);
      mul.add(dp, ll.transpose(), qb.phi());
      mul.add(dvc, al.transpose(), dnum.topRows(rows));
      if (valid < rows) {  // padded keys: no gradient
        dvc.bottomRows(rows - valid).setZero();
        dp.bottomRows(rows - valid).setZero();
      }
      kb.backward(dp, w, d_k.middleRows(t0, rows));
      if (t0 == 0) break;
      // Move r_state and r_z to the frame of `before`, then add this chunk's queries.
      const S rescale = std::exp(before - after);
      r_state *= rescale;
      r_z *= rescale;
      auto qs = qb.phi();
      run.scale_by_alpha(qs);
      mul.add(r_state, qs.transpose(), dnum.topRows(rows));
      r_z.noalias() += dden.topRows(rows).transpose() * qs;
    }
  }

 private:
  static constexpr S minus_infinity = -std::numeric_limits<S>::infinity();
  using Block = detail::favor::FeatureBlock<S, Map>;
  using Prefix = detail::favor::CausalPrefix<S>;
  using Shift = detail::favor::Shift;
  using Products = detail::Products<S>;
  using Directions = detail::favor::PackedDirections<S>;

  Index largest_chunk() const { return std::max(chunk(false), chunk(true)); }

  // Causal FAVOR+ over the rows of q from the running state (state, z) and run's shift: chunk
  // by chunk, each query sees the state of the chunks before and its chunk's keys up to itself;
  // keys at or beyond `keys` are padding.
  template <class St, class Z, class Den>
  void causal_chunks(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Index keys,
                     const Directions& w, Block& qb, Block& kb, Den& den, Prefix& run, St& state,
                     Z& z, const Products& mul) const {
    const Index n_q = q.rows(), c = chunk(true);
    for (Index t0 = 0; t0 < n_q; t0 += c) {
      const Index rows = std::min(c, n_q - t0);
      const Index valid = std::clamp<Index>(keys - t0, 0, rows);  // padded keys are at the end
      qb.compute(q.middleRows(t0, rows), w, Shift::own, epsilon_);
      kb.compute(k.middleRows(t0, rows), w, Shift::own, key_epsilon(true), valid);
      const auto al = run.enter(qb, kb);
      auto o = out.middleRows(t0, rows);
      auto dl = den.topRows(rows);
      mul.assign(o, qb.phi(), state);
      dl.noalias() = qb.phi() * z.transpose();
      run.scale_by_alpha(o, dl);
      mul.add(o, al, v.middleRows(t0, rows));
      dl += al.rowwise().sum();
      detail::favor::normalise(o, dl);
      run.advance(kb, v.middleRows(t0, rows), state, z);
    }
  }

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

  std::size_t index_of(Index head) const {
    return static_cast<std::size_t>(config_.per_head ? head : 0);
  }

  // state = Σ_j K'_jᵀ V_j and z = Σ_j K'_j over the given (valid) keys, chunk by chunk, all
  // under one shift: the largest log-feature of the keys, found on the way (a chunk that
  // raises it rescales what came before), so there is no separate pass over the keys.
  // ε is added at the end as if to every key feature. Returns the shift.
  template <class St, class Z>
  S summarise_keys(ConstView<S> k, ConstView<S> v, const Directions& w, Block& kb, St& state, Z& z,
                   const Products& mul, Workspace& ws) const {
    Workspace::Frame frame(ws);
    auto v_sum = ws.matrix<S>(1, v.cols());
    v_sum.setZero();
    S shift = minus_infinity;
    const Index c = chunk(false);
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
    const S eps = key_epsilon(false);
    if (eps != S(0)) {
      v_sum *= eps;
      for (Index r = 0; r < state.rows(); ++r)  // (rowwise() += would make a temporary)
        state.row(r) += v_sum.row(0);
      z.array() += eps * S(k.rows());
    }
    return shift;
  }

  Config config_;
  HeadLayout layout_;
  S epsilon_ = 0;
  std::vector<Matrix<S>> w_;
};

static_assert(AttentionPolicy<Favor<float>>);
static_assert(AttentionPolicy<Favor<double, ReluFeatures>>);

}  // namespace effattn

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
#include "effattn/attention/favor/pieces.hpp"
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
class Favor : public detail::favor::Pieces<S, Features> {
 public:
  using Scalar = S;
  using Map = Features;  ///< the feature map φ
  static constexpr const char* name = "favor";
  static constexpr bool supports_causal = true;
  static constexpr bool supports_cross_attention = true;  // bidirectional only
  static constexpr bool splits_queries = false;           // keys are summarised per call

  using Base = detail::favor::Pieces<S, Features>;
  using Config = typename Base::Config;
  using Base::add_key_epsilon;
  using Base::attend;
  using Base::attend_causal;
  using Base::causal_key_gradients;
  using Base::causal_query_gradients;
  using Base::causal_shifts;
  using Base::chunk;
  using Base::feature_width;
  using Base::key_gradients;
  using Base::projection;
  using Base::query_gradients;
  using Base::sum_keys;

  struct Saved {
    std::size_t bytes() const { return 0; }  // everything is recomputed in backward
  };

  Favor() : Favor(Config{}, HeadLayout{}) {}
  Favor(Config config, HeadLayout layout) : Base(config, layout) {}

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
    Workspace::Frame frame(ws);
    const Index f = feature_width(), d_v = v.cols(), keys = ctx.key_length;
    out.setZero();
    if (keys == 0) return;
    auto state = ws.matrix<S>(f, d_v);  // Σ K'ᵀV
    auto z = ws.matrix<S>(1, f);        // Σ K'
    if (ctx.causal) {
      state.setZero();
      z.setZero();
      S shift = minus_infinity;
      attend_causal(q, k, v, out, keys, ctx.head, state, z, shift, ws);
      return;
    }
    auto v_sum = ws.matrix<S>(1, d_v);
    sum_keys(k.topRows(keys), v.topRows(keys), ctx.head, state, z, v_sum, ws);
    add_key_epsilon(state, z, v_sum, keys);
    attend(q, state, z, out, ctx.head, ws);
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
    attend_causal(q, k, v, out, q.rows(), head, st.state, st.z, st.shift, ws);
    st.length += q.rows();
  }

  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved&, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    Workspace::Frame frame(ws);
    const Index n_q = q.rows(), dv = v.cols(), f = feature_width(), keys = ctx.key_length;
    d_q.setZero();
    d_k.setZero();
    d_v.setZero();
    if (keys == 0) return;
    auto state = ws.matrix<S>(f, dv);
    auto z = ws.matrix<S>(1, f);
    auto r_state = ws.matrix<S>(f, dv);  // Σ Q'ᵀ dnum over the queries that see a key
    auto r_z = ws.matrix<S>(1, f);       // Σ Q'ᵀ dden
    if (ctx.causal) {
      state.setZero();
      z.setZero();
      S* normalisers = ws.take<S>(n_q);
      S* shifts = ws.take<S>(causal_shifts(n_q));
      causal_query_gradients(q, k, v, out, d_out, keys, ctx.head, state, z, minus_infinity,
                             normalisers, shifts, d_q, View<S>(r_state.topRows(0)),
                             View<S>(r_z.topRows(0)), ws);
      r_state.setZero();
      r_z.setZero();
      causal_key_gradients(q, k, v, out, d_out, keys, ctx.head, normalisers, shifts, r_state, r_z,
                           d_k, d_v, ws);
      return;
    }
    auto v_sum = ws.matrix<S>(1, dv);
    const S shift = sum_keys(k.topRows(keys), v.topRows(keys), ctx.head, state, z, v_sum, ws);
    add_key_epsilon(state, z, v_sum, keys);
    query_gradients(q, out, d_out, state, z, ctx.head, d_q, r_state, r_z, ws);
    key_gradients(k.topRows(keys), v.topRows(keys), shift, r_state, r_z, ctx.head,
                  d_k.topRows(keys), d_v.topRows(keys), ws);
  }

 private:
  using Base::config_;
  using Base::largest_chunk;
  using Base::layout_;
  using Base::product_extent;
  using typename Base::Directions;
  using typename Base::Products;
  static constexpr S minus_infinity = Base::minus_infinity;
};

static_assert(AttentionPolicy<Favor<float>>);
static_assert(AttentionPolicy<Favor<double, ReluFeatures>>);

}  // namespace effattn

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
#include "effattn/attention/favor/causal_blocks.hpp"
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

/// FAVOR+ (Choromanski et al. 2021, docs/algorithms.md §2): with q' = q·d^{-1/4}, k' = k·d^{-1/4}
/// and features Q' = φ(q'), K' = φ(k') from m random directions W [m × d_k],
///   bidirectional  out = diag(Q'(K'ᵀ1))⁻¹ · Q'(K'ᵀV)
///   causal         out_i = Q'_i S_i / (Q'_i · z_i),  S_i = Σ_{j≤i} K'_jᵀ V_j,  z_i = Σ_{j≤i} K'_j
/// never forming an n×n matrix. Causal runs in chunks of `chunk` tokens: a masked chunk ×
/// chunk product inside a chunk, the m×d_v state carried across chunks.
/// Time O(n·m·d); scratch O(chunk·m + chunk² + m·d_v) per thread, and per (sequence, head)
/// what its blocks share: causal, two m·d_v sums per block (at most 32 blocks) and n_q
/// scalars. Stabiliser (all shifts cancel in the normalisation): queries subtract their own
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
class Favor : public detail::favor::CausalBlocks<S, Features> {
 public:
  using Scalar = S;
  using Map = Features;  ///< the feature map φ
  static constexpr const char* name = "favor";
  static constexpr bool supports_causal = true;
  static constexpr bool supports_cross_attention = true;  // bidirectional only
  static constexpr bool splits_queries = false;           // keys are summarised per call

  using Base = detail::favor::CausalBlocks<S, Features>;
  using Config = typename Base::Config;
  using Base::add_key_epsilon;
  using Base::attend;
  using Base::attend_causal;
  using Base::causal_block_rows;
  using Base::causal_blocks;
  using Base::causal_key_gradients;
  using Base::causal_query_gradients;
  using Base::causal_shifts;
  using Base::chunk;
  using Base::feature_width;
  using Base::key_gradients;
  using Base::projection;
  using Base::query_gradients;
  using Base::sum_causal_keys;
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
    // W packed for the call; bidirectional states packed once complete (forward: the state;
    // backward: its transpose, then r_state and its transpose).
    const std::size_t kept = Directions::bytes(config_.features, d_k) +
                             2 * Products::kept_bytes(f, d_v) + 2 * Products::kept_bytes(d_v, f);
    // A block's partial sums (bidirectional; causal: its own sums, the later blocks' gradient
    // sums and the merged sums its chunks see), and the sums a call's blocks share (forward
    // and backward alone).
    const Index shared = std::max(shared_scalars(n_q, n_k, d_k, d_v, false),
                                  shared_scalars(n_q, n_k, d_k, d_v, true));
    const std::size_t blocks =
        std::max(2 * W::bytes_for<S>(f * d_v) + 2 * W::bytes_for<S>(f) + W::bytes_for<S>(d_v),
                 3 * W::bytes_for<S>(KeySums::scalars(f, d_v))) +
        W::bytes_for<S>(shared);
    return chunk_buffers + state + kept + blocks + Products::bytes(Products::capacity(p, p));
  }

  /// Rows per block of a bidirectional call (4 chunks, 512 by default): AttentionCore runs the
  /// key sums and the queries of one head as blocks of this many rows on all threads.
  Index block_rows() const { return 4 * chunk(false); }

  /// Bidirectional calls run in blocks, in this order: the key sums of each key block, merged in
  /// block order into sums every block shares (the stabiliser shift of each block moved to the
  /// largest); then the query blocks (forward: the output; backward: d_q and the query sums the
  /// keys' gradients need, merged in block order); backward then the key blocks' d_k and d_v.
  ///
  /// Causal calls run in blocks of causal_block_rows(n) rows (whole chunks, at least 8; 32 blocks
  /// for long sequences). Block b starts from the prefix sums of the blocks before it and
  /// sums its own keys apart from zero; prefix b + 1 = prefix b ⊕ its own sums. With threads to
  /// spare
  /// (`spread` ≥ 2, at least two threads per (sequence, head)), the keys of blocks 1 … B−2 are
  /// summed ahead as tasks of their own (work a single thread would not do: about 40 % of the
  /// forward's, whatever the block count), so that every query block can start once its prefix is
  /// merged; backward then merges what each block's queries add to the keys before it from the last
  /// block back, and runs the key blocks. Otherwise a call is one task that runs the blocks in
  /// order. Both run the same pieces on the same blocks and merge in the same order: the same bits.
  ///
  /// Blocks are fixed rows of the sequence, so the bits do not depend on the threads.
  Index forward_blocks(Index n_q, Index n_k, Index, Index, bool causal, Index spread) const {
    if (causal) return split_causal(n_q, spread) ? 2 * causal_blocks(n_q) - 2 : 1;
    return blocks_of(n_k) + blocks_of(n_q);
  }
  Index backward_blocks(Index n_q, Index n_k, Index, Index, bool causal, Index spread) const {
    if (causal) return split_causal(n_q, spread) ? 3 * causal_blocks(n_q) - 2 : 1;
    return 2 * blocks_of(n_k) + blocks_of(n_q);
  }
  /// Scalars a call's blocks share. Bidirectional: state and r_state (features × d_v), z and
  /// r_z, v_sum, shift. Causal: each block's prefix sums and gradient sums (KeySums records),
  /// the rows' normalisers and the chunks' shifts.
  Index shared_scalars(Index n_q, Index, Index, Index d_v, bool causal) const {
    const Index f = feature_width();
    return causal ? causal_shared_scalars(n_q, d_v) : 2 * f * d_v + 2 * f + d_v + 1;
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Saved* saved,
               const HeadContext& ctx, Workspace& ws) const {
    detail::forward_in_block_order(*this, q, k, v, out, saved, ctx, ws);
  }

  template <class Order>
  void forward_block(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
                     Saved*, const HeadContext& ctx, Workspace& ws, const Order& order,
                     S* shared) const {
    Workspace::Frame frame(ws);
    const Index f = feature_width(), d_v = v.cols(), keys = ctx.key_length;
    if (ctx.causal) return causal_forward_block(block, q, k, v, out, ctx, ws, order, shared);
    const Index key_blocks = blocks_of(k.rows());
    Shared sh(shared, f, d_v);
    if (block < key_blocks) return sum_key_block(block, k, v, ctx, ws, order, sh);
    order.wait(key_blocks);
    const Index i0 = (block - key_blocks) * block_rows();
    const Index rows = std::min(block_rows(), q.rows() - i0);
    auto o = out.middleRows(i0, rows);
    if (keys == 0) {
      o.setZero();
      return;
    }
    attend(q.middleRows(i0, rows), sh.state, sh.z, o, ctx.head, ws);
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
                ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    detail::backward_in_block_order(*this, q, k, v, out, d_out, saved, d_q, d_k, d_v, ctx, ws);
  }

  template <class Order>
  void backward_block(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                      ConstView<S> d_out, const Saved&, View<S> d_q, View<S> d_k, View<S> d_v,
                      const HeadContext& ctx, Workspace& ws, const Order& order, S* shared) const {
    Workspace::Frame frame(ws);
    const Index n_q = q.rows(), dv = v.cols(), f = feature_width(), keys = ctx.key_length;
    if (ctx.causal)
      return causal_backward_block(block, q, k, v, out, d_out, d_q, d_k, d_v, ctx, ws, order,
                                   shared);
    const Index key_blocks = blocks_of(k.rows()), query_blocks = blocks_of(n_q);
    const Index rows_per = block_rows();
    Shared sh(shared, f, dv);
    if (block < key_blocks) return sum_key_block(block, k, v, ctx, ws, order, sh);
    if (block < key_blocks + query_blocks) {
      order.wait(key_blocks);
      const Index i0 = (block - key_blocks) * rows_per, rows = std::min(rows_per, n_q - i0);
      auto r_state = ws.matrix<S>(f, dv);
      auto r_z = ws.matrix<S>(1, f);
      if (keys == 0) {
        d_q.middleRows(i0, rows).setZero();
        r_state.setZero();
        r_z.setZero();
      } else {
        query_gradients(q.middleRows(i0, rows), out.middleRows(i0, rows),
                        d_out.middleRows(i0, rows), sh.state, sh.z, ctx.head,
                        d_q.middleRows(i0, rows), r_state, r_z, ws);
      }
      order([&] {
        if (block == key_blocks) {
          sh.r_state = r_state;
          sh.r_z = r_z;
        } else {
          sh.r_state += r_state;
          sh.r_z += r_z;
        }
      });
      return;
    }
    order.wait(key_blocks + query_blocks);
    const Index j0 = (block - key_blocks - query_blocks) * rows_per;
    const Index rows = std::min(rows_per, k.rows() - j0);
    const Index valid = std::clamp<Index>(keys - j0, 0, rows);  // padded keys: no gradient
    key_gradients(k.middleRows(j0, valid), v.middleRows(j0, valid), *sh.shift, sh.r_state, sh.r_z,
                  ctx.head, d_k.middleRows(j0, valid), d_v.middleRows(j0, valid), ws);
    d_k.middleRows(j0 + valid, rows - valid).setZero();
    d_v.middleRows(j0 + valid, rows - valid).setZero();
  }

 private:
  /// The sums a call's blocks share, in the memory AttentionCore gives each (sequence, head).
  struct Shared {
    Shared(S* p, Index f, Index dv)
        : state(p, f, dv),
          r_state(p + f * dv, f, dv),
          z(p + 2 * f * dv, 1, f),
          r_z(p + 2 * f * dv + f, 1, f),
          v_sum(p + 2 * f * dv + 2 * f, 1, dv),
          shift(p + 2 * f * dv + 2 * f + dv) {}
    Eigen::Map<Matrix<S>> state, r_state, z, r_z, v_sum;
    S* shift;
  };

  Index blocks_of(Index n) const {
    return std::max<Index>(1, (n + block_rows() - 1) / block_rows());
  }

  /// Key block `block`: its valid keys' sums in its own frame, merged in block order into the
  /// shared sums (in the frame of the largest shift so far); the last block adds ε.
  template <class Order>
  void sum_key_block(Index block, ConstView<S> k, ConstView<S> v, const HeadContext& ctx,
                     Workspace& ws, const Order& order, Shared& sh) const {
    Workspace::Frame frame(ws);
    const Index f = feature_width(), dv = v.cols(), rows_per = block_rows();
    const Index j0 = block * rows_per, rows = std::min(rows_per, k.rows() - j0);
    const Index valid = std::clamp<Index>(ctx.key_length - j0, 0, rows);
    auto state = ws.matrix<S>(f, dv);
    auto z = ws.matrix<S>(1, f);
    auto v_sum = ws.matrix<S>(1, dv);
    const S shift =
        sum_keys(k.middleRows(j0, valid), v.middleRows(j0, valid), ctx.head, state, z, v_sum, ws);
    order([&] {
      if (block == 0 || *sh.shift == minus_infinity) {
        sh.state = state;
        sh.z = z;
        if (block == 0)
          sh.v_sum = v_sum;
        else
          sh.v_sum += v_sum;
        *sh.shift = shift;
      } else if (shift != minus_infinity) {
        const S top = std::max(*sh.shift, shift);
        const S a = std::exp(*sh.shift - top), c = std::exp(shift - top);
        sh.state = a * sh.state + c * state;
        sh.z = a * sh.z + c * z;
        sh.v_sum += v_sum;
        *sh.shift = top;
      }
      if (block == blocks_of(k.rows()) - 1)
        add_key_epsilon(sh.state, sh.z, sh.v_sum, ctx.key_length);
    });
  }

  using Base::causal_backward_block;
  using Base::causal_forward_block;
  using Base::causal_shared_scalars;
  using Base::config_;
  using Base::largest_chunk;
  using Base::layout_;
  using Base::product_extent;
  using Base::split_causal;
  using typename Base::Directions;
  using typename Base::KeySums;
  using typename Base::Products;
  static constexpr S minus_infinity = Base::minus_infinity;
};

static_assert(AttentionPolicy<Favor<float>>);
static_assert(AttentionPolicy<Favor<double, ReluFeatures>>);

}  // namespace effattn

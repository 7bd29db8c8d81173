#pragma once
// FullAttention: exact softmax attention, tiled with an online softmax (FlashAttention).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "effattn/attention/attention_policy.hpp"
#include "effattn/attention/full_attention/packed_backward.hpp"
#include "effattn/attention/full_attention/packed_forward.hpp"
#include "effattn/attention/full_attention/score_mods.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/finite.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/product.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn {

/// Exact attention, out = softmax(s · q kᵀ + mask) v with s = 1/√d_k by default.
///
/// Queries are processed in tiles of `query_tile` rows against key tiles of `key_tile`
/// rows, keeping a running row maximum and sum (docs/algorithms.md §1), so no n_q × n_k
/// matrix ever exists: time O(n_q·n_k·d), scratch O(query_tile·(key_tile + d)) per thread
/// forward, plus O((n_q + n_k)·d) backward. In float (with GCC or Clang) forward and backward
/// run on the packed micro-kernel (attention/full_attention/packed_forward.hpp and
/// packed_backward.hpp; the operands are packed once per call into O((n_q + n_k)·d) scratch);
/// double uses Eigen's products. Key tiles no row of a query tile sees are skipped: causal
/// attention does half the work, a window of W keys n·W instead of n². Rows with no visible key
/// (padding leaves none) give 0. Forward keeps each row's log-sum-exp (n_q scalars) for backward.
template <class S = float>
class FullAttention {
 public:
  using Scalar = S;
  static constexpr const char* name = "full";
  static constexpr bool supports_causal = true;
  /// CausalWindow<W> and SlidingWindow<W>: the key tiles outside every row's window are skipped.
  static constexpr bool supports_window = true;
  static constexpr bool supports_cross_attention = true;
  static constexpr bool splits_queries = true;

  /// Tile sizes of 0 are chosen automatically: for the packed float kernels see packed_tiles()
  /// and packed_backward_tiles(); for Eigen's products (double) the largest powers of two up to 256
  /// query and 512 key rows whose d-wide slices fit Eigen's stack buffer for packing
  /// (EIGEN_STACK_ALLOCATION_LIMIT, 128 KiB by default), so that Eigen's products never
  /// allocate. Larger explicit tiles work, but Eigen may then allocate per product.
  struct Config {
    Index query_tile = 0;           ///< query rows per tile; 0: automatic
    Index key_tile = 0;             ///< key rows per tile; 0: automatic
    std::optional<double> scale{};  ///< logit scale; default 1/√d_k
    /// ALiBi's linear position biases (off by default; see Alibi).
    Alibi alibi{};
    /// Logit soft-capping (Gemma 2): each scaled logit x becomes softcap·tanh(x / softcap)
    /// before ALiBi's bias is added; 0: none.
    double softcap = 0;
  };

  /// Row log-sum-exp of the scaled, masked logits (+∞ for rows that see no key).
  struct Saved {
    RowVector<S> lse;
    std::size_t bytes() const { return static_cast<std::size_t>(lse.size()) * sizeof(S); }
  };

  FullAttention() : FullAttention(Config{}, HeadLayout{}) {}
  FullAttention(Config config, HeadLayout layout) : config_(config), layout_(layout) {
    detail::require(config_.query_tile >= 0, "FullAttention", "query_tile", config_.query_tile,
                    "a number of rows (0 for automatic)");
    detail::require(config_.key_tile >= 0, "FullAttention", "key_tile", config_.key_tile,
                    "a number of rows (0 for automatic)");
    detail::require(!config_.scale || (std::isfinite(*config_.scale) && *config_.scale > 0),
                    "FullAttention", "scale", config_.scale.value_or(0.0),
                    "a finite positive number (or none for 1/sqrt(d_k))");
    detail::require(std::isfinite(config_.softcap) && config_.softcap >= 0, "FullAttention",
                    "softcap", config_.softcap, "a finite cap > 0, or 0 for none");
    if (config_.alibi.enabled) {
      const auto& given = config_.alibi.slopes;
      detail::require(
          given.empty() || Index(given.size()) == layout_.heads, "FullAttention", "alibi.slopes",
          detail::concat(given.size(), " slopes"),
          detail::concat("one per head (", layout_.heads, "), or none for the default"));
      for (const double slope : given)
        detail::require(std::isfinite(slope) && slope > 0, "FullAttention", "alibi.slopes", slope,
                        "finite positive slopes");
      slopes_ = given.empty() ? Alibi::default_slopes(layout_.heads) : given;
    }
  }

  /// The score modifiers of head h (ALiBi's slope, the soft cap).
  detail::full::ScoreMods<S> score_mods(Index head) const {
    return {slopes_.empty() ? S(0) : S(slopes_[static_cast<std::size_t>(head)]),
            S(config_.softcap)};
  }

  const Config& config() const { return config_; }

  Saved make_saved(Index n_q, Index /*n_k*/) const { return Saved{RowVector<S>(n_q)}; }

  void validate(Index n_q, Index n_k, Index d_k, Index d_v, bool /*causal*/) const {
    detail::require(n_q > 0, "FullAttention", "n_q", n_q, "at least 1 query");
    detail::require(n_k > 0, "FullAttention", "n_k", n_k, "at least 1 key");
    detail::require(d_k > 0, "FullAttention", "d_k", d_k, "a head width of at least 1");
    detail::require(d_v > 0, "FullAttention", "d_v", d_v, "a head width of at least 1");
  }

  /// The tile sizes used for heads of these widths.
  struct Tiles {
    Index query, key;
  };
  Tiles tiles(Index d_k, Index d_v) const {
    constexpr Index budget = detail::stack_pack_scalars<S>;
    const Index width = std::max<Index>({d_k, d_v, 1});
    auto pow2_at_most = [](Index limit, Index cap) {
      Index t = 16;  // below 16 rows, tiles cost more in overhead than they save
      while (2 * t <= std::min(limit, cap))
        t *= 2;
      return t;
    };
    // The d-wide panels of a tile must fit Eigen's stack buffer (with the query side
    // rounded up to Eigen's register block); tile × tile products are sliced instead.
    return {config_.query_tile > 0 ? config_.query_tile
                                   : pow2_at_most(budget / width - detail::pack_row_rounding, 256),
            config_.key_tile > 0 ? config_.key_tile : pow2_at_most(budget / width, 512)};
  }

  /// Whether forward runs the packed micro-kernel (float, with GCC/Clang vector extensions)
  /// rather than Eigen's products.
  static constexpr bool packed = std::is_same_v<S, float> && detail::simd::enabled;

  /// The packed forward's tiles: `query_tile` (default 96, a multiple of the micro-kernel's
  /// 6 or 12 rows) query rows and `key_tile` (default 512) keys, the key tile rounded up to
  /// whole panels. The 96 × 512 tile of probabilities (192 KiB) stays in L2; measured on
  /// AVX-512 and AVX2 builds, larger key tiles spend less on each tile's rescale.
  /// In a window of at most window_tiled_keys keys (use_window) the defaults fit the window:
  /// query tiles of window_query_rows rows, and key tiles that hold every key such a tile sees
  /// (W + rows − 1, plus a panel for the alignment of the first), so a query tile is one pass:
  /// less of each tile is masked out (a 96-row tile of a 512-key window spans 607 keys).
  detail::full::PackedTiles packed_tiles() const {
    Index rows = 96, keys = 512;
    if (const Index w = window_keys(); w > 0 && w <= window_tiled_keys) {
      rows = window_query_rows;
      keys = detail::kernel::padded(w + rows - 1 + detail::kernel::panel - 1);
    }
    return {config_.query_tile > 0 ? config_.query_tile : rows,
            config_.key_tile > 0 ? config_.key_tile : keys};
  }
  /// The packed backward's tiles: `query_tile` (default 96) query rows and `key_tile` (default
  /// 384) keys. The outer loop runs over key tiles, whose dK and dV (384 × d) stay in L2 while
  /// the query tiles stream; measured on AVX-512 and AVX2 builds, 192-key tiles are 3–7 % slower.
  /// In a window of at most window_tiled_keys keys the default key tile is
  /// window_backward_keys: the rows that see a key tile are W + keys − 1, of which each sees
  /// only its W, so narrow key tiles waste less.
  detail::full::PackedTiles packed_backward_tiles() const {
    const Index w = window_keys();
    const Index keys = w > 0 && w <= window_tiled_keys ? window_backward_keys : 384;
    return {config_.query_tile > 0 ? config_.query_tile : 96,
            config_.key_tile > 0 ? config_.key_tile : keys};
  }

  /// The masking's window, told by the core that runs this policy (AttentionCore, on
  /// construction), so that the default tiles fit it. Only speed depends on it: which keys a
  /// row sees comes with each call (HeadContext).
  void use_window(KeyWindow window) { window_ = window; }
  /// Keys a row of the window sees at most (0: no window).
  Index window_keys() const {
    if (window_.before == KeyWindow::none) return 0;
    return window_.before + 1 + (window_.after == KeyWindow::none ? 0 : window_.after);
  }
  static constexpr Index window_tiled_keys = 1024;
  static constexpr Index window_query_rows = 48;
  static constexpr Index window_backward_keys = 128;

  /// Rows of a query tile: AttentionCore splits a head's queries into whole tiles.
  Index query_grain(Index d_k, Index d_v) const {
    if constexpr (packed) return packed_tiles().query;
    return tiles(d_k, d_v).query;
  }

  std::size_t scratch_bytes(Index n_q, Index n_k, Index d_k, Index d_v) const {
    const Tiles t = tiles(d_k, d_v);
    const Index br = std::min(t.query, n_q), bc = std::min(t.key, n_k);
    using W = Workspace;
    const std::size_t fwd =
        W::bytes_for<S>(br * d_k) + W::bytes_for<S>(br * bc) + 3 * W::bytes_for<S>(br);
    const std::size_t bwd =
        W::bytes_for<S>(n_q * d_k) + W::bytes_for<S>(n_q) + 3 * W::bytes_for<S>(br * bc);
    if constexpr (packed)
      return std::max(
          detail::full::packed_forward_bytes(n_q, n_k, d_k, d_v, packed_tiles()),
          detail::full::packed_backward_bytes(n_q, n_k, d_k, d_v, packed_backward_tiles()));
    return std::max(fwd, bwd);
  }

  /// Incremental causal decoding: the keys and values of the tokens decoded so far (a KV
  /// cache), grown by doubling. decode() appends the new tokens' keys and values and attends
  /// their queries to every cached key up to their own position, exactly as the causal
  /// forward over the whole sequence would (cost O(m·length·d) for m new tokens). A few new
  /// tokens against a long cache run in blocks of decode_block_keys cached keys, one task each,
  /// merged in block order by their log-sum-exp (flash decoding): the threads share a head.
  ///
  /// Under CausalWindow<W> the cache drops the keys no later token sees: when it would grow, it
  /// first moves its last W − 1 keys to the front, so it holds at most about 2·(W + m) keys
  /// (m: the most tokens one call decoded) however long the sequence, at O(1) rows moved per
  /// token on average.
  struct DecodeState {
    Matrix<S> k, v;
    Index length = 0;    ///< tokens decoded so far
    RowVector<S> lse;    ///< the new rows' running log-sum-exp while blocks merge
    KeyWindow window{};  ///< the masking's window (none: every key is kept)
    Index first = 0;     ///< the position of the token in row 0 of k and v
    /// Keys in the cache: rows [0, cached()) of k and v.
    Index cached() const { return length - first; }
    std::size_t bytes() const { return sizeof(S) * std::size_t(k.size() + v.size()); }
  };
  /// Cached keys per decode block.
  static constexpr Index decode_block_keys = 2048;
  DecodeState decode_state(Index /*head*/, Index d_k, Index d_v) const {
    return {Matrix<S>(0, d_k), Matrix<S>(0, d_v), 0, {}, {}, 0};
  }
  std::size_t decode_scratch_bytes(Index m, Index length, Index d_k, Index d_v) const {
    const Index g = layout_.group();  // a cache serves a group of query heads (GQA)
    return scratch_bytes(m, length + m, d_k, d_v) + Workspace::bytes_for<S>(m * g * d_v) +
           Workspace::bytes_for<S>(m * g) + Workspace::bytes_for<S>(decode_block_keys * g) +
           Workspace::bytes_for<S>(g);
  }
  /// Blocks of a decode of m new tokens that makes the cache n keys long: the cache in blocks of
  /// decode_block_keys when the new tokens are few (at most decode_few_queries), else one (the
  /// forward's kernel: the queries are many, and one task per head keeps the cores busy).
  static constexpr Index decode_few_queries = 8;
  Index decode_blocks(Index m, Index n) const {
    if (m > decode_few_queries) return 1;
    return std::max<Index>(1, (n + decode_block_keys - 1) / decode_block_keys);
  }
  /// Appends the new tokens' keys and values to the cache (before any block runs).
  void decode_append(ConstView<S> k, ConstView<S> v, DecodeState& st) const {
    const Index m = k.rows();
    if (st.window.before != KeyWindow::none && st.cached() + m > st.k.rows()) {
      // The first new token (at position length) sees keys from length − before on, and every
      // later token fewer: the keys before that are dropped, the rest move to the front.
      const Index keep_from = std::max(st.first, st.length - st.window.before);
      const Index drop = keep_from - st.first, keep = st.length - keep_from;
      for (Index r = 0; drop > 0 && r < keep; ++r) {  // upwards: a row is read before overwritten
        st.k.row(r) = st.k.row(drop + r);
        st.v.row(r) = st.v.row(drop + r);
      }
      st.first = keep_from;
    }
    const Index at = st.cached(), n = at + m;
    if (st.k.rows() < n) {
      const Index rows = std::max<Index>({n, 2 * st.k.rows(), 16});
      st.k.conservativeResize(rows, Eigen::NoChange);
      st.v.conservativeResize(rows, Eigen::NoChange);
    }
    st.k.middleRows(at, m) = k;
    st.v.middleRows(at, m) = v;
    st.length += m;
    st.lse.resize(m * layout_.group());
  }
  /// Block `block` of decode_blocks(m, st.cached()) after decode_append: the new queries q against
  /// its cached keys, merged into out inside merge(step), which runs the blocks' steps in block
  /// order. Under GQA a cache serves a group of query heads: q [m × group·d_k] holds the group's
  /// heads (`head` the first), out [m × group·d_v], and each block of the cache is read once for
  /// all of them (its keys times the group's queries, one product).
  template <class Merge>
  void decode_block(Index block, ConstView<S> q, View<S> out, Index head, DecodeState& st,
                    Workspace& ws, Merge&& merge) const {
    const Index dk = st.k.cols(), dv = st.v.cols(), group = q.cols() / dk;
    const Index m = q.rows(), n = st.cached(), blocks = decode_blocks(m, n);
    HeadContext ctx;
    ctx.head = head;
    ctx.key_length = n;
    ctx.causal_shift = n - m;
    ctx.causal = true;
    ctx.window = st.window;
    if (blocks == 1) {
      merge([&] {
        for (Index j = 0; j < group; ++j) {
          ctx.head = head + j;
          forward(q.middleCols(j * dk, dk), st.k.topRows(n), st.v.topRows(n),
                  out.middleCols(j * dv, dv), nullptr, ctx, ws);
        }
      });
      return;
    }
    const Index j0 = block * decode_block_keys, cols = std::min(decode_block_keys, n - j0);
    ctx.key_length = cols;
    ctx.causal_shift = n - m - j0;  // query i sees the block's key j iff j0 + j ≤ n − m + i
    Workspace::Frame frame(ws);
    auto o = ws.matrix<S>(m, group * dv);
    S* lse = ws.take<S>(m * group);  // head-major: lse[j·m + i]
    S* logits = ws.take<S>(cols * group);
    S* inverse = ws.take<S>(group);  // 1 / each head's sum
    const S s = scale(dk);
    const auto kb = st.k.middleRows(j0, cols);
    const auto vb = st.v.middleRows(j0, cols);
    using RowMajor = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    // A few queries read the block's keys and values in place, once (a product with the group's
    // queries; nothing is packed): decoding is bound by reading the cache.
    for (Index i = 0; i < m; ++i) {
      const Index from = ctx.key_begin(i), seen = ctx.key_end(i) - from;
      if (seen == 0) {  // the row sees no key of this block
        o.row(i).setZero();
        for (Index j = 0; j < group; ++j)
          lse[j * m + i] = std::numeric_limits<S>::infinity();
        continue;
      }
      // p[:, j]: head j's logits over the keys the row sees.
      Eigen::Map<Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>> p(logits, seen, group);
      const Eigen::Map<const RowMajor, 0, Eigen::OuterStride<>> qi(q.row(i).data(), group, dk,
                                                                   Eigen::OuterStride<>(dk));
      if (group == 1)
        p.col(0).noalias() = s * (kb.middleRows(from, seen) * qi.row(0).transpose());
      else
        p.noalias() = s * (kb.middleRows(from, seen) * qi.transpose());
      Eigen::Map<RowMajor> oi(&o(i, 0), group, dv);
      for (Index j = 0; j < group; ++j) {
        S* pj = logits + j * seen;
        if (const auto mods = score_mods(head + j); mods.active())
          mods.apply(pj, seen, ctx.position(i), from);
        const S top = detail::max_of(pj, seen);
        const S sum = detail::exp_shifted_sum(pj, seen, top);
        lse[j * m + i] = detail::row_logsumexp(top, sum);
        inverse[j] = sum == S(0) ? S(0) : S(1) / sum;
      }
      if (group == 1)
        oi.row(0).noalias() = p.col(0).transpose() * vb.middleRows(from, seen);
      else
        oi.noalias() = p.transpose() * vb.middleRows(from, seen);
      for (Index j = 0; j < group; ++j)
        oi.row(j) *= inverse[j];
    }
    merge([&] {
      if (block == 0) {
        out.setZero();
        st.lse.setConstant(-std::numeric_limits<S>::infinity());
      }
      for (Index j = 0; j < group; ++j)
        detail::merge_softmax_rows(out.middleCols(j * dv, dv), o.middleCols(j * dv, dv),
                                   st.lse.data() + j * m, lse + j * m, m);
    });
  }
  void decode(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Index head,
              DecodeState& st, Workspace& ws) const {
    decode_append(k, v, st);
    const Index blocks = decode_blocks(q.rows(), st.cached());
    for (Index b = 0; b < blocks; ++b)
      decode_block(b, q, out, head, st, ws, detail::InCallOrder{});
  }

  S scale(Index d_k) const {
    return static_cast<S>(config_.scale ? *config_.scale : 1.0 / std::sqrt(double(d_k)));
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Saved* saved,
               const HeadContext& ctx, Workspace& ws) const {
    if constexpr (packed) {
      detail::full::packed_forward(q, k, v, out,
                                   saved ? saved->lse.data() + ctx.query_offset : nullptr,
                                   scale(q.cols()), ctx, packed_tiles(), ws, score_mods(ctx.head));
      return;
    }
    const auto mods = score_mods(ctx.head);
    const Index n_q = q.rows(), d_k = q.cols();
    const auto [br, bc] = tiles(d_k, v.cols());
    const S s = scale(d_k);
    const detail::EigenSingleThreadScope serial_products;
    // A masked key gets probability 0, but 0 · ∞ or 0 · NaN in P·V would still reach the row:
    // when some value is not finite, masked tiles multiply each row by its visible keys only.
    const bool exact_mask = !detail::all_finite(v.topRows(ctx.key_length));
    for (Index i0 = 0; i0 < n_q; i0 += br) {
      const Index rows = std::min(br, n_q - i0);
      Workspace::Frame frame(ws);
      auto qs = ws.matrix<S>(rows, d_k);
      auto logits = ws.matrix<S>(rows, std::min(bc, std::max<Index>(ctx.key_length, 1)));
      S* m = ws.take<S>(rows);
      S* sum = ws.take<S>(rows);
      S* rescale = ws.take<S>(rows);
      std::fill(m, m + rows, -std::numeric_limits<S>::infinity());
      std::fill(sum, sum + rows, S(0));
      qs.noalias() = s * q.middleRows(i0, rows);
      auto o = out.middleRows(i0, rows);
      o.setZero();

      const TileRange tile = tile_range(ctx, i0, rows);
      for (Index j0 = tile.key_start; j0 < tile.key_stop; j0 += bc) {
        const Index cols = std::min(bc, tile.key_stop - j0);
        auto p = logits.leftCols(cols);
        p.noalias() = qs * k.middleRows(j0, cols).transpose();
        const bool masked = tile.masks(j0, cols);
        if (masked) mask_tile(p, ctx, i0, j0);
        if (mods.active()) modify_tile(p, mods, ctx, i0, j0);
        detail::online_softmax_step(p, m, sum, rescale);
        if (j0 > tile.key_start)
          o.array().colwise() *= Eigen::Map<const Eigen::Array<S, -1, 1>>(rescale, rows);
        if (exact_mask && masked) {
          for (Index r = 0; r < rows; ++r) {
            const auto [from, to] = ctx.columns_seen(i0 + r, j0, cols);
            o.row(r).noalias() +=
                p.row(r).segment(from, to - from) * v.middleRows(j0 + from, to - from);
          }
          continue;
        }
        detail::sliced_product<true>(o, p, v.middleRows(j0, cols));
      }
      for (Index r = 0; r < rows; ++r) {
        // sum is 0 only for a row that saw no key; NaN input keeps it NaN, and so the output.
        if (sum[r] == S(0))
          o.row(r).setZero();
        else
          o.row(r) *= S(1) / sum[r];
        if (saved) saved->lse[ctx.query_offset + i0 + r] = detail::row_logsumexp(m[r], sum[r]);
      }
    }
  }

  /// Backward runs in blocks of keys (the packed float kernel; one block otherwise), so that the
  /// threads share one head: see backward_block and detail::full::packed_backward_blocks.
  Index backward_blocks(Index /*n_q*/, Index n_k, Index /*d_k*/, Index /*d_v*/, bool causal,
                        Index /*spread*/) const {
    if constexpr (packed)
      return detail::full::packed_backward_blocks(n_k, packed_backward_tiles(), causal);
    return 1;
  }

  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                const HeadContext& ctx, Workspace& ws) const {
    detail::backward_in_block_order(*this, q, k, v, out, d_out, saved, d_q, d_k, d_v, ctx, ws);
  }

  /// Block `block` of backward_blocks(): overwrites its keys' rows of d_k and d_v, and adds its
  /// part of d_q inside merge(step), which runs the blocks' steps in block order (the first
  /// block sets d_q, the last scales it), so d_q has the same bits whatever thread runs which.
  template <class Merge>
  void backward_block(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                      ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                      const HeadContext& ctx, Workspace& ws, Merge&& merge,
                      S* /*shared: none*/) const {
    if constexpr (packed) {
      detail::full::packed_backward_block(
          block, q, k, v, out, d_out, saved.lse.data() + ctx.query_offset, d_q, d_k, d_v,
          scale(q.cols()), ctx, packed_backward_tiles(), ws, merge, score_mods(ctx.head));
      return;
    }
    merge([&] { eigen_backward(q, k, v, out, d_out, saved, d_q, d_k, d_v, ctx, ws); });
  }

 private:
  void eigen_backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                      ConstView<S> d_out, const Saved& saved, View<S> d_q, View<S> d_k, View<S> d_v,
                      const HeadContext& ctx, Workspace& ws) const {
    const Index n_q = q.rows(), n_k = k.rows(), dk = q.cols();
    const auto [br, bc] = tiles(dk, v.cols());
    const S s = scale(dk);
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    auto qs = ws.matrix<S>(n_q, dk);
    qs.noalias() = s * q;
    S* delta = ws.take<S>(n_q);  // D_i = rowsum(dO ∘ O)
    for (Index r = 0; r < n_q; ++r)
      delta[r] = d_out.row(r).dot(out.row(r));
    auto p_buf = ws.matrix<S>(std::min(br, n_q), std::min(bc, n_k));
    auto dp_buf = ws.matrix<S>(std::min(br, n_q), std::min(bc, n_k));
    const auto mods = score_mods(ctx.head);
    auto slope_buf = ws.matrix<S>(std::min(br, n_q), std::min(bc, n_k));
    d_q.setZero();
    d_k.setZero();
    d_v.setZero();
    const auto lse = saved.lse.segment(ctx.query_offset, n_q);

    for (Index j0 = 0; j0 < ctx.key_length; j0 += bc) {
      const Index cols = std::min(bc, ctx.key_length - j0);
      const auto kj = k.middleRows(j0, cols);
      const auto vj = v.middleRows(j0, cols);
      auto dkj = d_k.middleRows(j0, cols);
      auto dvj = d_v.middleRows(j0, cols);
      for (Index i0 = 0; i0 < n_q; i0 += br) {
        const Index rows = std::min(br, n_q - i0);
        const TileRange tile = tile_range(ctx, i0, rows);
        // wholly above the causal diagonal, or outside the window
        if (j0 >= tile.key_stop || j0 + cols <= tile.key_start) continue;
        auto p = p_buf.topLeftCorner(rows, cols);
        auto dp = dp_buf.topLeftCorner(rows, cols);
        p.noalias() = qs.middleRows(i0, rows) * kj.transpose();
        if (tile.masks(j0, cols)) mask_tile(p, ctx, i0, j0);
        auto cap_slope = slope_buf.topLeftCorner(rows, cols);
        if (mods.active()) modify_tile(p, mods, ctx, i0, j0, &cap_slope);
        for (Index r = 0; r < rows; ++r)
          detail::exp_shifted_sum(&p(r, 0), cols, lse[i0 + r]);
        const auto d_oi = d_out.middleRows(i0, rows);
        detail::sliced_product<true>(dvj, p.transpose(), d_oi);
        dp.noalias() = d_oi * vj.transpose();
        for (Index r = 0; r < rows; ++r)
          dp.row(r) = (p.row(r).array() * (dp.row(r).array() - delta[i0 + r])).matrix();
        if (mods.cap != S(0)) dp.array() *= cap_slope.array();  // through the soft cap
        detail::sliced_product<true>(d_q.middleRows(i0, rows), dp, kj);
        detail::sliced_product<true>(dkj, dp.transpose(), qs.middleRows(i0, rows));
      }
    }
    d_q *= s;
  }

  struct TileRange {
    Index key_start, key_stop;  // keys [key_start, key_stop) are visible to some row of the tile
    Index all_start, all_stop;  // keys [all_start, all_stop) are visible to every row of it
    /// Whether some row of the tile misses one of the keys [j0, j0 + cols).
    bool masks(Index j0, Index cols) const { return j0 < all_start || j0 + cols > all_stop; }
  };

  // key_begin(i) and key_end(i) grow with i, so the first row bounds what all rows see from
  // above and the last from below, and the first and last rows together what any row sees.
  static TileRange tile_range(const HeadContext& ctx, Index i0, Index rows) {
    const Index last = i0 + rows - 1;
    return {ctx.key_begin(i0), ctx.key_end(last), ctx.key_begin(last), ctx.key_end(i0)};
  }

  /// The score modifiers on the keys each row of the tile at (i0, j0) sees; with `cap_slope`,
  /// the soft cap's derivative there (0 where the row sees nothing).
  template <class Tile, class Slope = Tile>
  static void modify_tile(Tile& p, const detail::full::ScoreMods<S>& mods, const HeadContext& ctx,
                          Index i0, Index j0, Slope* cap_slope = nullptr) {
    const Index cols = p.cols();
    if (cap_slope) cap_slope->setZero();
    for (Index r = 0; r < p.rows(); ++r) {
      const auto [from, to] = ctx.columns_seen(i0 + r, j0, cols);
      if (to == from) continue;
      mods.apply(&p(r, from), to - from, ctx.position(i0 + r), j0 + from,
                 cap_slope ? &(*cap_slope)(r, from) : nullptr);
    }
  }

  template <class Tile>
  static void mask_tile(Tile& p, const HeadContext& ctx, Index i0, Index j0) {
    const Index cols = p.cols();
    for (Index r = 0; r < p.rows(); ++r) {
      const auto [from, to] = ctx.columns_seen(i0 + r, j0, cols);
      p.row(r).head(from).setConstant(-std::numeric_limits<S>::infinity());
      p.row(r).tail(cols - to).setConstant(-std::numeric_limits<S>::infinity());
    }
  }

  Config config_;
  HeadLayout layout_;
  KeyWindow window_{};
  std::vector<double> slopes_;  ///< ALiBi's, one per head; empty: no ALiBi
};

static_assert(AttentionPolicy<FullAttention<float>>);
static_assert(AttentionPolicy<FullAttention<double>>);

}  // namespace effattn

#pragma once
// CausalBlocks: causal FAVOR+ as blocks of a sequence, each from the prefix sums of the blocks
// before it, merged in block order; the schedule of Favor's causal forward and backward.

#include <algorithm>
#include <cmath>
#include <limits>

#include "effattn/attention/favor/causal_pieces.hpp"
#include "effattn/attention/favor/causal_prefix.hpp"
#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail::favor {

/// Block b of a causal call starts from the prefix sums of blocks 0 … b−1 and sums its own keys
/// apart from zero; prefix b + 1 = prefix b ⊕ its own sums (KeySums::add). One task runs the
/// blocks in order, the prefix growing as it goes. With threads to spare (HeadContext::spread
/// ≥ 2), the keys of blocks 1 … B−2 are summed ahead as tasks of their own (work one thread
/// would not do, about 40 % of the forward's) so that the query blocks run side by side;
/// backward then merges what each block's queries add to the keys before it from the last block
/// back, and runs the key blocks. Both schedules run the same pieces on the same blocks and
/// merge in the same order: the same bits (tests/features/test_thread_counts.cpp).
template <class S, FeatureMap Map>
class CausalBlocks : public CausalPieces<S, Map> {
  using Base = CausalPieces<S, Map>;

 public:
  using Base::Base;
  using KeySums = detail::favor::KeySums<S>;
  using Base::attend_causal_block;
  using Base::causal_key_gradients;
  using Base::causal_query_gradients_block;
  using Base::causal_shifts;
  using Base::chunk;
  using Base::feature_width;
  using Base::sum_causal_keys;

  /// Rows of a causal block for a sequence of n tokens: whole chunks, at least 8, and at most 32
  /// blocks. The key sums a split adds cost the same share of the work at any block count, but
  /// a block run in order (one thread per head) pays for its prefix sums' merges: blocks of 2
  /// chunks cost 10 % at 8 heads on 1 thread, blocks of 8 nothing measurable.
  Index causal_block_rows(Index n) const {
    const Index c = chunk(true), fair = (n + max_causal_blocks - 1) / max_causal_blocks;
    return std::max(8 * c, (fair + c - 1) / c * c);
  }
  Index causal_blocks(Index n) const {
    const Index rows = causal_block_rows(n);
    return std::max<Index>(1, (n + rows - 1) / rows);
  }

  /// Whether a call with `spread` threads per (sequence, head) runs its blocks as tasks.
  bool split_causal(Index n, Index spread) const { return spread >= 2 && causal_blocks(n) >= 2; }

  /// Scalars the blocks of a causal call share: per block its prefix sums and the gradient sums
  /// of the keys before it (KeySums records), the rows' normalisers and the chunks' shifts.
  Index causal_shared_scalars(Index n, Index d_v) const {
    const Index blocks = causal_blocks(n);
    return 2 * blocks * KeySums::scalars(feature_width(), d_v) + n +
           blocks * causal_shifts(causal_block_rows(n));
  }

 protected:
  using Base::minus_infinity;
  static constexpr Index max_causal_blocks = 32;

  /// What the blocks of a causal call share: per block its prefix sums and the gradient sums
  /// of the keys before it, then every row's normaliser, then every block's chunk shifts.
  struct CausalShared {
    CausalShared(const CausalBlocks& favor, S* p, Index length, Index width, Index d_v)
        : base(p),
          blocks(favor.causal_blocks(length)),
          rows(favor.causal_block_rows(length)),
          record(KeySums::scalars(width, d_v)),
          spans(favor.causal_shifts(rows)),
          f(width),
          dv(d_v),
          n(length) {}
    KeySums prefix(Index b) const { return KeySums(base + b * record, f, dv); }
    KeySums gradient(Index b) const { return KeySums(base + (blocks + b) * record, f, dv); }
    S* normalisers(Index b) const { return base + 2 * blocks * record + b * rows; }
    S* shifts(Index b) const { return base + 2 * blocks * record + n + b * spans; }
    Index first(Index b) const { return b * rows; }
    Index size(Index b) const { return std::min(rows, n - b * rows); }
    /// Keys of block b that are not padding, for `keys` valid keys.
    Index valid(Index b, Index keys) const {
      return std::clamp<Index>(keys - first(b), 0, size(b));
    }
    template <class M>
    auto rows_of(M& m, Index b) const {
      return m.middleRows(first(b), size(b));
    }
    S* base;
    Index blocks, rows, record, spans, f, dv, n;
  };

  /// What both directions run first. In order (one task): sweep(b) over every block, each
  /// block's own sums (`own`) then giving the next prefix. As tasks: block 0 is sweep(0),
  /// blocks 1 … B−2 sum their keys alone; each then merges the next prefix in block order.
  /// Returns whether `block` was one of these tasks.
  template <class Order, class Sweep>
  bool prefix_stage(Index block, bool in_order, ConstView<S> k, ConstView<S> v,
                    const HeadContext& ctx, Workspace& ws, const Order& order,
                    const CausalShared& sh, const KeySums& own, Sweep&& sweep) const {
    if (in_order) {
      sh.prefix(0).clear();
      for (Index b = 0; b < sh.blocks; ++b) {
        sweep(b);
        advance_prefix(sh, b, own);
      }
      return true;
    }
    if (block == 0) {
      sh.prefix(0).clear();
      sweep(0);
    } else if (block < sh.blocks - 1) {
      own.clear();
      sum_causal_keys(sh.rows_of(k, block), sh.rows_of(v, block), sh.valid(block, ctx.key_length),
                      ctx.head, own.state(), own.z(), own.shift(), ws);
    } else {
      return false;
    }
    order([&] { advance_prefix(sh, block, own); });
    return true;
  }

  /// prefix b + 1 ← prefix b ⊕ the own sums of block b.
  static void advance_prefix(const CausalShared& sh, Index b, const KeySums& own) {
    if (b + 1 >= sh.blocks) return;
    sh.prefix(b + 1).assign(sh.prefix(b));
    sh.prefix(b + 1).add(own);
  }

  template <class Order>
  void causal_forward_block(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v,
                            View<S> out, const HeadContext& ctx, Workspace& ws, const Order& order,
                            S* shared) const {
    const Index f = feature_width(), dv = v.cols(), keys = ctx.key_length;
    const CausalShared sh(*this, shared, q.rows(), f, dv);
    const KeySums own(ws.take<S>(sh.record), f, dv);
    // Query block b from its prefix; its own keys' sums into `own`.
    const auto attend_block = [&](Index b) {
      if (keys == 0) {
        sh.rows_of(out, b).setZero();
        own.clear();
        return;
      }
      attend_causal_block(sh.rows_of(q, b), sh.rows_of(k, b), sh.rows_of(v, b), sh.rows_of(out, b),
                          sh.valid(b, keys), ctx.head, sh.prefix(b), own, ws);
    };
    const bool in_order = !split_causal(q.rows(), ctx.spread);
    if (prefix_stage(block, in_order, k, v, ctx, ws, order, sh, own, attend_block)) return;
    // Query blocks 1 … B−1, each once its prefix is merged.
    const Index b = block - (sh.blocks - 2);
    order.wait(b);
    attend_block(b);
  }

  template <class Order>
  void causal_backward_block(Index block, ConstView<S> q, ConstView<S> k, ConstView<S> v,
                             ConstView<S> out, ConstView<S> d_out, View<S> d_q, View<S> d_k,
                             View<S> d_v, const HeadContext& ctx, Workspace& ws, const Order& order,
                             S* shared) const {
    const Index f = feature_width(), dv = v.cols(), keys = ctx.key_length;
    const CausalShared sh(*this, shared, q.rows(), f, dv);
    const Index last = sh.blocks - 1;
    const KeySums own(ws.take<S>(sh.record), f, dv);
    // First sweep of block b from its prefix: d_q, normalisers, chunk shifts, own sums, and in
    // gradient(b) what its queries add to the keys before it.
    const auto query_block = [&](Index b) {
      if (keys == 0) {
        sh.rows_of(d_q, b).setZero();
        own.clear();
        sh.gradient(b).clear();
        return;
      }
      causal_query_gradients_block(sh.rows_of(q, b), sh.rows_of(k, b), sh.rows_of(v, b),
                                   sh.rows_of(out, b), sh.rows_of(d_out, b), sh.valid(b, keys),
                                   ctx.head, sh.prefix(b), own, sh.normalisers(b), sh.shifts(b),
                                   sh.rows_of(d_q, b), sh.gradient(b), ws);
    };
    // gradient(b) ← gradient(b) ⊕ gradient(b + 1): what every query from block b on adds to
    // the keys before block b (in the frame of the smaller shift).
    const auto merge_later = [&](Index b) {
      if (b + 1 <= last) sh.gradient(b).add(sh.gradient(b + 1), false);
    };
    // Second sweep of block b: its keys' d_k, d_v, given what the later blocks' queries add.
    const auto key_block = [&](Index b) {
      Workspace::Frame frame(ws);
      const KeySums later(ws.take<S>(sh.record), f, dv);
      if (b < last)
        later.assign(sh.gradient(b + 1));
      else
        later.clear();
      // To the frame of the block's last sums (that of later's, but for a block of padding).
      const S after = sh.shifts(b)[(sh.size(b) - 1) / chunk(true) + 1];
      const bool finite = after != minus_infinity && later.shift() != minus_infinity;
      const S rescale = finite ? std::exp(after - later.shift()) : S(0);
      later.state() *= rescale;
      later.z() *= rescale;
      causal_key_gradients(sh.rows_of(q, b), sh.rows_of(k, b), sh.rows_of(v, b), sh.rows_of(out, b),
                           sh.rows_of(d_out, b), sh.valid(b, keys), ctx.head, sh.normalisers(b),
                           sh.shifts(b), later.state(), later.z(), sh.rows_of(d_k, b),
                           sh.rows_of(d_v, b), ws);
    };
    const bool in_order = !split_causal(q.rows(), ctx.spread);
    if (prefix_stage(block, in_order, k, v, ctx, ws, order, sh, own, query_block)) {
      if (in_order)
        for (Index b = last; b >= 0; --b) {
          key_block(b);
          if (b >= 1) merge_later(b);
        }
      return;
    }
    // Steps B−1 … 2B−3: the query blocks B−1 … 1, merging their gradient sums from the last
    // back; then the key blocks B−1 … 0, each once the sums after it are merged.
    const Index queries_end = 2 * sh.blocks - 2;
    if (block < queries_end) {
      const Index b = last - (block - last);
      order.wait(b);
      query_block(b);
      order([&] { merge_later(b); });
    } else {
      const Index b = last - (block - queries_end);
      order.wait(std::min(queries_end + 1 - b, queries_end));
      key_block(b);
    }
  }
};

}  // namespace effattn::detail::favor

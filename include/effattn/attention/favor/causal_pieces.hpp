#pragma once
// CausalPieces: the sweeps of causal FAVOR+ (prefix sums over chunks, and the two backward
// sweeps), from running sums or from a block's prefix, for Favor's blocks and for
// mpi::SequenceParallel's shards.

#include <algorithm>
#include <cmath>
#include <limits>

#include "effattn/attention/favor/causal_prefix.hpp"
#include "effattn/attention/favor/pieces.hpp"
#include "effattn/attention/feature_maps/feature_map.hpp"
#include "effattn/core/product.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

namespace effattn::detail::favor {

/// Pieces and the causal sweeps. A sweep runs chunk by chunk: each query sees the sums of the
/// keys before its chunk and its own chunk's keys up to itself (CausalPrefix). The sums before
/// are running sums that the sweep advances (attend_causal: decoding, a rank's shard), or a
/// block's prefix left as it is, the block's own keys summed apart from zero (the _block
/// pieces: Favor's blocks, which merge them in block order).
template <class S, FeatureMap Map>
class CausalPieces : public Pieces<S, Map> {
  using Base = Pieces<S, Map>;

 public:
  using Base::Base;
  using Base::chunk;
  using Base::feature_width;
  using Base::projection;

  /// Causal: adds the keys of k, v (rows from `keys` on are padding) to the running sums (state,
  /// z in the frame `shift`, updated), without queries, chunk by chunk as attend_causal adds
  /// them: the same keys give the same bits either way.
  void sum_causal_keys(ConstView<S> k, ConstView<S> v, Index keys, Index head, View<S> state,
                       View<S> z, S& shift, Workspace& ws) const {
    const Index n = k.rows();
    if (n == 0 || keys <= 0) return;
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index c = chunk(true);
    const Products mul = products(ws, n, n, v.cols());
    const Directions w(mul, ws, projection(head));
    Block kb = block(ws, mul, std::min(c, n));
    Prefix run(ws, mul, std::min(c, n));
    for (Index t0 = 0; t0 < n; t0 += c) {
      const Index rows = std::min(c, n - t0);
      const Index valid = std::clamp<Index>(keys - t0, 0, rows);
      if (valid == 0) break;
      kb.compute(k.middleRows(t0, rows), w, Shift::own, key_epsilon(true), valid);
      add_chunk_keys(run, kb, v.middleRows(t0, rows), state, z, shift);
    }
  }

  /// Causal: the output of the queries q (the same positions as the keys k, v; rows from
  /// `keys` on are padded keys) from the running sums of the keys before them (state, z in the
  /// frame `shift`), which it advances over k and v. Chunk by chunk, each query sees the sums
  /// before and its own chunk's keys up to itself.
  void attend_causal(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Index keys,
                     Index head, View<S> state, View<S> z, S& shift, Workspace& ws) const {
    attend_causal_sweep(q, k, v, out, keys, head, nullptr, nullptr, state, z, shift, ws);
  }

  /// Causal, one block of a sequence: attend_causal from the sums `before` (left as they are),
  /// the block's own keys summed apart from zero into `own` (as sum_causal_keys sums them);
  /// before ⊕ own (KeySums::add) is then the sums after the block.
  void attend_causal_block(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Index keys,
                           Index head, const KeySums<S>& before, const KeySums<S>& own,
                           Workspace& ws) const {
    own.clear();
    attend_causal_sweep(q, k, v, out, keys, head, &before, &own, own.state(), own.z(), own.shift(),
                        ws);
  }

  /// Scalars causal_query_gradients keeps in `shifts` for n_q queries.
  Index causal_shifts(Index n_q) const { return n_q / chunk(true) + 2; }

  /// Causal backward, first sweep (queries forward): from the running sums of the keys
  /// before q's first row (state, z in the frame `shift`; advanced over k, v), d_q (written),
  /// and for the second sweep each row's normaliser and each chunk's state shift (n_q and
  /// causal_shifts(n_q) scalars). With r_state and r_z not empty, they get (written) what
  /// these queries add to the gradients of the keys before q, Σ Q'ᵀ dnum and Σ Q'ᵀ dden, in the
  /// frame `shift` (zero when it is −∞: no key before q).
  void causal_query_gradients(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                              ConstView<S> d_out, Index keys, Index head, View<S> state, View<S> z,
                              S shift, S* normalisers, S* shifts, View<S> d_q, View<S> r_state,
                              View<S> r_z, Workspace& ws) const {
    causal_query_sweep(q, k, v, out, d_out, keys, head, nullptr, nullptr, state, z, shift,
                       normalisers, shifts, d_q, r_state, r_z, ws);
  }

  /// Causal backward, first sweep of one block of a sequence: causal_query_gradients from the
  /// sums `before` (left as they are), the block's own keys summed apart into `own` (as in
  /// attend_causal_block), and what its queries add to the keys before it in `gathered` (in
  /// the frame of `before`; no keys when `before` has none).
  void causal_query_gradients_block(ConstView<S> q, ConstView<S> k, ConstView<S> v,
                                    ConstView<S> out, ConstView<S> d_out, Index keys, Index head,
                                    const KeySums<S>& before, const KeySums<S>& own, S* normalisers,
                                    S* shifts, View<S> d_q, const KeySums<S>& gathered,
                                    Workspace& ws) const {
    own.clear();
    causal_query_sweep(q, k, v, out, d_out, keys, head, &before, &own, own.state(), own.z(),
                       own.shift(), normalisers, shifts, d_q, gathered.state(), gathered.z(), ws);
    gathered.shift() = before.shift();
  }

  /// Causal backward, second sweep (keys backward) after the first on the same arguments:
  /// d_k, d_v (written), given r_state and r_z, what the queries after q add to the keys'
  /// gradients (Σ Q'ᵀ dnum, Σ Q'ᵀ dden, zero if none) in the frame of the state shift after
  /// the last row; they are used up.
  void causal_key_gradients(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                            ConstView<S> d_out, Index keys, Index head, const S* normalisers,
                            const S* shifts, View<S> r_state, View<S> r_z, View<S> d_k, View<S> d_v,
                            Workspace& ws) const {
    d_k.setZero();
    d_v.setZero();
    if (keys <= 0) return;
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index n_q = q.rows(), dv = v.cols(), c = chunk(true);
    const Products mul = products(ws, n_q, n_q, dv);
    const Directions w(mul, ws, projection(head));
    Block qb = block(ws, mul, std::min(c, n_q)), kb = block(ws, mul, std::min(c, n_q));
    Rows g(ws, std::min(c, n_q), feature_width(), dv);
    Prefix run(ws, mul, std::min(c, n_q));
    auto l = ws.matrix<S>(std::min(c, n_q), std::min(c, n_q));
    Index chunk_index = (n_q - 1) / c + 1;
    for (Index t0 = ((n_q - 1) / c) * c; t0 >= 0; t0 -= c) {
      --chunk_index;
      const Index rows = std::min(c, n_q - t0);
      const Index valid = std::clamp<Index>(keys - t0, 0, rows);
      const S before = shifts[chunk_index], after = shifts[chunk_index + 1];
      qb.compute(q.middleRows(t0, rows), w, Shift::own, epsilon_);
      kb.compute(k.middleRows(t0, rows), w, Shift::own, key_epsilon(true), valid);
      run.restart(before);
      const auto al = run.enter(qb, kb);
      g.output_grads(out.middleRows(t0, rows), d_out.middleRows(t0, rows),
                     Eigen::Map<const Eigen::Matrix<S, -1, 1>>(normalisers + t0, rows));
      auto ll = g.local(l, rows, v.middleRows(t0, rows), run, mul);
      // Later queries, through r_state and r_z (in the frame of `after`).
      auto dp = g.d_phi.topRows(rows);
      auto dvc = d_v.middleRows(t0, rows);
      mul.assign(dp, v.middleRows(t0, rows), r_state.transpose());
      dp.rowwise() += r_z.row(0);
      mul.assign(dvc, kb.phi(), r_state);
      run.scale_by_beta(dp, after, kb);
      run.scale_by_beta(dvc, after, kb);
      mul.add(dp, ll.transpose(), qb.phi());
      mul.add(dvc, al.transpose(), g.dnum.topRows(rows));
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
      mul.add(r_state, qs.transpose(), g.dnum.topRows(rows));
      r_z.noalias() += g.dden.topRows(rows).transpose() * qs;
    }
  }

 protected:
  using Base::block;
  using Base::epsilon_;
  using Base::key_epsilon;
  using Base::minus_infinity;
  using Base::products;
  using typename Base::Block;
  using typename Base::Directions;
  using typename Base::Prefix;
  using typename Base::Products;
  using typename Base::Rows;
  using typename Base::Shift;

  /// Adds a chunk's valid keys to sums (state, z in the frame `shift`, updated): the one place
  /// causal keys enter a sum, so that a block's keys give the same bits in every sweep.
  static void add_chunk_keys(Prefix& run, Block& kb, ConstView<S> v, View<S> state, View<S> z,
                             S& shift) {
    if (kb.valid() == 0) return;
    run.restart(shift);
    run.add_keys(kb, v, state, z);
    shift = run.shift();
  }

  /// What a chunk's queries see of the keys before the chunk: (state, z, shift) alone, or when
  /// a block starts from the sums `before`, before ⊕ own (made here only when both hold keys).
  class Seen {
   public:
    Seen(Workspace& ws, const KeySums<S>* before, const KeySums<S>* own, Index f, Index dv)
        : before_(before),
          own_(own),
          merged_(ws.take<S>(before ? KeySums<S>::scalars(f, dv) : 0), f, dv) {}
    /// Readies the sums for a chunk whose running sums are (state, z, shift); returns their frame.
    S prepare(S shift) {
      which_ = 0;
      if (!before_ || before_->shift() == minus_infinity) return shift;
      which_ = 1;
      if (shift == minus_infinity) return before_->shift();
      which_ = 2;
      merged_.assign(*before_);
      merged_.add(*own_);
      return merged_.shift();
    }
    ConstView<S> state(ConstView<S> running) const {
      return which_ == 0 ? running : ConstView<S>(which_ == 1 ? before_->state() : merged_.state());
    }
    ConstView<S> z(ConstView<S> running) const {
      return which_ == 0 ? running : ConstView<S>(which_ == 1 ? before_->z() : merged_.z());
    }
    /// The frame of the sums before the first chunk.
    S entry(S shift) const { return before_ ? std::max(before_->shift(), shift) : shift; }

   private:
    const KeySums<S>* before_;
    const KeySums<S>* own_;
    KeySums<S> merged_;
    int which_ = 0;
  };

  void attend_causal_sweep(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out, Index keys,
                           Index head, const KeySums<S>* before, const KeySums<S>* own,
                           View<S> state, View<S> z, S& shift, Workspace& ws) const {
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index n_q = q.rows(), c = chunk(true);
    const Products mul = products(ws, n_q, n_q, v.cols());
    const Directions w(mul, ws, projection(head));
    Block qb = block(ws, mul, std::min(c, n_q)), kb = block(ws, mul, std::min(c, n_q));
    auto den = ws.matrix<S>(std::min(c, n_q), 1);
    Prefix run(ws, mul, std::min(c, n_q));
    Seen seen(ws, before, own, feature_width(), v.cols());
    for (Index t0 = 0; t0 < n_q; t0 += c) {
      const Index rows = std::min(c, n_q - t0);
      const Index valid = std::clamp<Index>(keys - t0, 0, rows);  // padded keys are at the end
      qb.compute(q.middleRows(t0, rows), w, Shift::own, epsilon_);
      kb.compute(k.middleRows(t0, rows), w, Shift::own, key_epsilon(true), valid);
      run.restart(seen.prepare(shift));
      const ConstView<S> st = seen.state(state), sz = seen.z(z);
      const auto al = run.enter(qb, kb);
      auto o = out.middleRows(t0, rows);
      auto dl = den.topRows(rows);
      mul.assign(o, qb.phi(), st);
      dl.noalias() = qb.phi() * sz.transpose();
      run.scale_by_alpha(o, dl);
      run.add_seen(o, al, v.middleRows(t0, rows));
      dl += al.rowwise().sum();
      detail::favor::normalise(o, dl);
      add_chunk_keys(run, kb, v.middleRows(t0, rows), state, z, shift);
    }
  }

  void causal_query_sweep(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                          ConstView<S> d_out, Index keys, Index head, const KeySums<S>* before,
                          const KeySums<S>* own, View<S> state, View<S> z, S& shift, S* normalisers,
                          S* shifts, View<S> d_q, View<S> r_state, View<S> r_z,
                          Workspace& ws) const {
    const detail::EigenSingleThreadScope serial_products;
    Workspace::Frame frame(ws);
    const Index n_q = q.rows(), dv = v.cols(), c = chunk(true);
    Seen seen(ws, before, own, feature_width(), dv);
    const S entry = seen.entry(shift);
    const bool gather = r_state.size() > 0 && entry != minus_infinity;
    if (r_state.size() > 0) {
      r_state.setZero();
      r_z.setZero();
    }
    const Products mul = products(ws, n_q, n_q, dv);
    const Directions w(mul, ws, projection(head));
    Block qb = block(ws, mul, std::min(c, n_q)), kb = block(ws, mul, std::min(c, n_q));
    Rows g(ws, std::min(c, n_q), feature_width(), dv);
    Prefix run(ws, mul, std::min(c, n_q));
    auto l = ws.matrix<S>(std::min(c, n_q), std::min(c, n_q));
    Index chunk_index = 0;
    for (Index t0 = 0; t0 < n_q; t0 += c, ++chunk_index) {
      const Index rows = std::min(c, n_q - t0);
      const Index valid = std::clamp<Index>(keys - t0, 0, rows);
      qb.compute(q.middleRows(t0, rows), w, Shift::own, epsilon_);
      kb.compute(k.middleRows(t0, rows), w, Shift::own, key_epsilon(true), valid);
      const S frame_shift = seen.prepare(shift);
      shifts[chunk_index] = frame_shift;
      run.restart(frame_shift);
      const ConstView<S> st = seen.state(state), sz = seen.z(z);
      const auto al = run.enter(qb, kb);
      Eigen::Map<Eigen::Matrix<S, -1, 1>> den_chunk(normalisers + t0, rows);
      den_chunk.noalias() = qb.phi() * sz.transpose();
      run.scale_by_alpha(den_chunk);
      den_chunk += al.rowwise().sum();
      g.output_grads(out.middleRows(t0, rows), d_out.middleRows(t0, rows), den_chunk);
      auto ll = g.local(l, rows, v.middleRows(t0, rows), run, mul);
      auto dp = g.d_phi.topRows(rows);
      mul.assign(dp, g.dnum.topRows(rows), st.transpose());
      dp.noalias() += g.dden.topRows(rows) * sz;
      run.scale_by_alpha(dp);
      mul.add(dp, ll, kb.phi());
      qb.backward(dp, w, d_q.middleRows(t0, rows));
      if (gather && frame_shift != minus_infinity) {  // (α is 0 before the first key)
        auto qs = qb.phi();
        run.scale_by_alpha(qs);
        qs *= std::exp(entry - frame_shift);
        mul.add(r_state, qs.transpose(), g.dnum.topRows(rows));
        r_z.noalias() += g.dden.topRows(rows).transpose() * qs;
      }
      add_chunk_keys(run, kb, v.middleRows(t0, rows), state, z, shift);
    }
    shifts[chunk_index] = seen.entry(shift);
  }
};

}  // namespace effattn::detail::favor

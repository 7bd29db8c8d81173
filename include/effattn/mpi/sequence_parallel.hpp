#pragma once
// SequenceParallel<Policy>: a policy whose sequences are sharded across MPI ranks, for
// MultiHeadAttention and every layer built on it.

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <utility>

#include "effattn/attention/favor.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/low_rank.hpp"
#include "effattn/attention/lsh.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/attention/projections/dense_projection.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/mpi/communicator.hpp"
#include "effattn/mpi/detail/fingerprint.hpp"
#include "effattn/mpi/ring_attention.hpp"
#include "effattn/mpi/sequence_shards.hpp"
#include "effattn/mpi/sharded_favor.hpp"
#include "effattn/mpi/sharded_low_rank.hpp"
#include "effattn/mpi/sharded_lsh.hpp"

namespace effattn::mpi {

template <class Policy, class Engine>
class ShardedCore;

namespace detail {
// What of each policy must be the same on every rank: its settings and its random state.
template <class S>
void add_policy(Fingerprint& f, Fingerprint&, const FullAttention<S>& p) {
  f.add(p.config().scale);
}
template <class S, class Map>
void add_policy(Fingerprint& f, Fingerprint& random, const Favor<S, Map>& p) {
  const auto& c = p.config();
  f.add(c.features).add(c.directions).add(c.norms).add(c.per_head).add(c.chunk).add(c.epsilon);
  for (Index h = 0; h < p.projections(); ++h)
    random.add_matrix(p.projection(h));
}
template <class S>
void add_policy(Fingerprint& f, Fingerprint&, const LowRank<S, DenseProjection>& p) {
  const auto& c = p.config();
  f.add(c.projection.k).add(c.projection.n_max).add(c.sharing).add(c.scale);
}
template <class S>
void add_policy(Fingerprint& f, Fingerprint& random, const LSHAttention<S>& p, Index heads) {
  const auto& c = p.config();
  f.add(c.chunk).add(c.rounds).add(c.buckets).add(c.look_back).add(c.look_forward);
  f.add(c.same_bucket).add(c.dedup).add(c.scale);
  for (Index h = 0; h < heads; ++h)
    for (Index r = 0; r < c.rounds; ++r)
      random.add_matrix(p.rotation(h, r, 1));  // the seed, or a rotation fixed by hand
}
template <class P>
void add_policy(Fingerprint& f, Fingerprint& random, const P& p, Index) {
  add_policy(f, random, p);
}
}  // namespace detail

/// MultiHeadAttention<mpi::SequenceParallel<Favor<float>>, Causal> is the multi-head block on
/// a sharded sequence: each rank passes its own rows (x [batch·n_r × d_model], shape {batch,
/// n_r, its valid rows}) and gets its rows of the output, equal to the block's output on the
/// whole sequences; only the attention communicates. Every layer around it is position-wise
/// or built from it, so whole encoders run sharded unchanged; a positional encoding needs the
/// shard's first position as its `offset` (contiguous shards). Parameter gradients are each
/// rank's share: sum them with all_reduce_gradients before an optimiser step. Self-attention
/// only; no incremental decoding.
///
/// SequenceParallel<P> is a P (its members, e.g. Favor's projection() and redraw(), are
/// there) whose Config adds the communicator and the shards. FullAttention runs as ring
/// attention (RingAttention), Favor with reductions of its sums (ShardedFavor), LowRank with
/// the learned (dense) projection with one reduction of E·K and F·V (ShardedLowRank), and
/// LSHAttention with its sorted chunks shared out among the ranks (ShardedLSH). LowRank's
/// pooling and convolution projections are not sequence-parallel and do not compile.
template <class Policy>
struct SequenceParallel {
  static_assert(sizeof(Policy) == 0,
                "effattn: mpi::SequenceParallel exists for FullAttention (ring attention), "
                "Favor, LSHAttention and LowRank<S, DenseProjection>; LowRank's pooling and "
                "convolution projections are not sequence-parallel (their windows would cross "
                "the shards).");
};

/// What the sequence-parallel policies share: the inner policy, made from Config::policy, and
/// the ranks and shards.
template <class InnerPolicy>
struct ShardedPolicy : InnerPolicy {
  using Inner = InnerPolicy;
  struct Config {
    typename Inner::Config policy{};       ///< the attention's own
    MPI_Comm comm = MPI_COMM_WORLD;        ///< the ranks that share the sequences
    std::optional<SequenceShards> shards;  ///< which positions each rank holds (required)
  };
  ShardedPolicy(const Config& config, HeadLayout layout) : Inner(config.policy, layout) {}

  /// Any local length: the whole sequence is checked when the call runs.
  void validate(Index, Index, Index, Index, bool) const {}
};

template <class S>
struct SequenceParallel<FullAttention<S>> : ShardedPolicy<FullAttention<S>> {
  using Base = ShardedPolicy<FullAttention<S>>;
  SequenceParallel(const typename Base::Config& config, HeadLayout layout) : Base(config, layout) {
    effattn::detail::require(!config.policy.alibi.enabled && config.policy.softcap == 0,
                             "mpi::SequenceParallel<FullAttention>", "policy",
                             "ALiBi or soft-capping",
                             "neither: ring attention does not run score modifiers yet");
  }
  static constexpr const char* name = "full (ring, sequence-parallel)";
  template <class Masking>
  using Engine = RingAttention<S, Masking>;
  template <class Masking>
  using core = ShardedCore<SequenceParallel, Engine<Masking>>;
};

template <class S, class Map>
struct SequenceParallel<Favor<S, Map>> : ShardedPolicy<Favor<S, Map>> {
  using ShardedPolicy<Favor<S, Map>>::ShardedPolicy;
  static constexpr const char* name = "favor (sequence-parallel)";
  template <class Masking>
  using Engine = ShardedFavor<S, Map, Masking>;
  template <class Masking>
  using core = ShardedCore<SequenceParallel, Engine<Masking>>;
};

template <class S>
struct SequenceParallel<LowRank<S, DenseProjection>> : ShardedPolicy<LowRank<S, DenseProjection>> {
  using ShardedPolicy<LowRank<S, DenseProjection>>::ShardedPolicy;
  static constexpr const char* name = "lowrank (sequence-parallel)";
  template <class Masking>
  using Engine = ShardedLowRank<S, Masking>;
  template <class Masking>
  using core = ShardedCore<SequenceParallel, Engine<Masking>>;
};

template <class S>
struct SequenceParallel<LSHAttention<S>> : ShardedPolicy<LSHAttention<S>> {
  using ShardedPolicy<LSHAttention<S>>::ShardedPolicy;
  static constexpr const char* name = "lsh (sequence-parallel)";
  template <class Masking>
  using Engine = ShardedLSH<S, Masking>;
  template <class Masking>
  using core = ShardedCore<SequenceParallel, Engine<Masking>>;
};

/// What MultiHeadAttention needs of a core (AttentionCore's interface), on a sharded engine
/// (RingAttention, ShardedFavor, ShardedLowRank, ShardedLSH) that runs the policy.
template <class Policy, class Engine>
class ShardedCore {
 public:
  using Scalar = typename Policy::Scalar;
  using S = Scalar;
  static constexpr bool causal = Engine::causal;

  ShardedCore(const typename Policy::Config& config, HeadLayout layout)
      : policy_(config, layout), engine_(layout, Communicator(config.comm), shards_of(config)) {}

  Policy& policy() { return policy_; }
  const Policy& policy() const { return policy_; }
  const HeadLayout& layout() const { return engine_.layout(); }

  /// Runs a layer's checks of a call (`checks`) on every rank together and compares the ranks'
  /// configurations: the layer's own (`layer`: d_model and the like), the head layout and
  /// shards, the masking, the policy's settings and its random features or rotations. A rank
  /// whose checks fail, or any difference, is an effattn::Error on every rank before any data
  /// moves (MultiHeadAttention calls this before its projections).
  template <class Checks>
  void agree(const std::array<std::int64_t, 3>& layer, Checks&& checks) const {
    detail::Fingerprint own, settings, random;
    for (const std::int64_t value : layer)
      own.add(value);
    settings.add(causal);
    detail::add_policy(settings, random, static_cast<const typename Policy::Inner&>(policy_),
                       engine_.layout().heads);
    const detail::NamedFingerprint parts[] = {{"layer (d_model, bias)", own.value()},
                                              {"policy settings and masking", settings.value()},
                                              {"random features or rotations", random.value()}};
    engine_.call().agree(checks, parts);
  }

  void forward(ConstView<S> q, ConstView<S> k, ConstView<S> v, View<S> out,
               const SequenceShape& q_shape, const SequenceShape& kv_shape, bool keep_saved) {
    self_attention(q, k, q_shape, kv_shape);
    engine_.forward(policy_, q, k, v, out, q_shape, keep_saved);
    kept_ = keep_saved;
  }
  void backward(ConstView<S> q, ConstView<S> k, ConstView<S> v, ConstView<S> out,
                ConstView<S> d_out, View<S> dq, View<S> dk, View<S> dv,
                const SequenceShape& q_shape, const SequenceShape& kv_shape) {
    self_attention(q, k, q_shape, kv_shape);
    engine_.backward(policy_, q, k, v, out, d_out, dq, dk, dv, q_shape);
  }
  /// Local: whether a forward kept its state for a backward on this shape.
  void check_backward(const SequenceShape& q_shape, const SequenceShape&) const {
    effattn::detail::require(kept_ && engine_.kept_for(q_shape), "mpi::SequenceParallel",
                             "backward", "called without a forward that kept its state",
                             "a forward with keep_saved on the same shape, then backward");
  }
  void release_saved() {
    engine_.release_saved();
    kept_ = false;
  }
  bool has_saved() const { return kept_; }
  std::size_t saved_bytes() const { return engine_.saved_bytes(); }
  std::size_t scratch_peak_bytes() const { return engine_.scratch_bytes(); }
  std::size_t scratch_growths() const { return 0; }
  /// Bytes this rank has handed to MPI since construction (the engine's count).
  std::size_t bytes_sent() const { return engine_.bytes_sent(); }
  void reset_peak() {}

  struct Decoder {
    Index batch = 0;
    Index length = 0;
    std::size_t bytes() const { return 0; }
  };
  template <class P = Policy>
  Decoder start_decoding(Index) const {
    static_assert(sizeof(P) == 0,
                  "effattn: sequence-parallel attention does not decode incrementally: decode "
                  "on one rank with the same parameters.");
    return {};
  }
  template <class P = Policy>
  void decode(ConstView<S>, ConstView<S>, ConstView<S>, View<S>, Decoder&) {
    static_assert(sizeof(P) == 0, "effattn: see start_decoding");
  }

 private:
  static SequenceShards shards_of(const typename Policy::Config& config) {
    effattn::detail::require(config.shards.has_value(), "mpi::SequenceParallel", "shards", "none",
                             "the SequenceShards of the sequences (which rows each rank holds)");
    return *config.shards;
  }
  static void self_attention(ConstView<S> q, ConstView<S> k, const SequenceShape& q_shape,
                             const SequenceShape& kv_shape) {
    effattn::detail::require(
        q.rows() == k.rows() && q_shape.seq == kv_shape.seq && q_shape.batch == kv_shape.batch,
        "mpi::SequenceParallel", "kv_shape", "another sequence",
        "self-attention (cross-attention is not sequence-parallel)");
  }

  Policy policy_;
  Engine engine_;
  bool kept_ = false;
};

}  // namespace effattn::mpi

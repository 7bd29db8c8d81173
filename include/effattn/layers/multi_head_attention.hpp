#pragma once
// MultiHeadAttention: Q/K/V/O projections around an AttentionCore.

#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "effattn/attention/attention_core.hpp"
#include "effattn/attention/attention_policy.hpp"
#include "effattn/attention/head_context.hpp"
#include "effattn/attention/head_layout.hpp"
#include "effattn/attention/masking.hpp"
#include "effattn/attention/random_state.hpp"
#include "effattn/attention/rotary.hpp"
#include "effattn/core/aliasing.hpp"
#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/instance.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/layers/activation_meter.hpp"
#include "effattn/layers/detail/gradients.hpp"
#include "effattn/layers/layer_workspace.hpp"

namespace effattn {

/// Multi-head attention with any AttentionPolicy (docs/algorithms.md §7):
///   Q = X W_q + b_q,  K = C W_k + b_k,  V = C W_v + b_v   (C = X for self-attention)
///   head_h = Policy(Q_h, K_h, V_h) per sequence,  Y = [head_1 … head_H] W_o + b_o.
/// Activations are [batch·seq × features]; a head is a column block of Q, K, V, so no head
/// is ever copied (see AttentionCore for the scheduling). Cost: 2·T·d·H·(2·d_k + 2·d_v)
/// for the projections plus the policy's cost for each (sequence, head).
///
/// `Masking` is Bidirectional, Causal or a window (attention/masking.hpp); a policy that cannot
/// attend under it does not compile with it. Weights are N(0, 1/fan_in) from the seed, biases 0.
/// Training: after `set_training(true)`, forward keeps Q, K, V, the merged heads and the policy's
/// Saved state (O(T·H·(d_k + d_v)) plus the policy's own, see activation_bytes), and backward then
/// writes the input gradient and adds to every parameter's gradient. When not training, those
/// buffers come from the calling thread's layer_workspace() and nothing outlives the call, so a
/// deep stack of blocks does not keep one set per block. It is a Layer (layers/layer.hpp) that
/// mixes positions: d_in = d_out = d_model.
template <class Policy, class Masking = Bidirectional>
class MultiHeadAttention {
 public:
  using Scalar = typename Policy::Scalar;
  using S = Scalar;
  using Core = typename detail::CoreOf<Policy, Masking>::type;
  static constexpr bool causal = Masking::causal;
  /// Shared-QK (Reformer): the policy says so with `shared_qk = true`; then keys are the
  /// queries (K = Q = X W_q + b_q), there is no w_k or b_k, and only self-attention exists.
  static constexpr bool shared_qk = detail::policy_shares_qk<Policy>;
  static constexpr bool position_wise = false;  ///< attention mixes positions
  static constexpr std::string_view parameter_group = "attention";

  struct Config {
    Index d_model = 512;
    Index heads = 8;
    Index d_head = 0;     ///< query/key width of a head; 0: d_model / heads
    Index d_value = 0;    ///< value/output width of a head; 0: d_head
    Index d_context = 0;  ///< width of the context in cross-attention; 0: d_model
    bool bias = true;
    std::uint64_t seed = 0;  ///< initialisation of every weight (and the policy's randomness)
    typename Policy::Config policy{};
    /// The masking's value: a window's size where the type leaves it to run time
    /// (`.masking = CausalWindow<>{512}`); nothing to set for the others.
    Masking masking{};
    /// Key/value heads (grouped-query attention; 1: multi-query), a divisor of heads, each
    /// shared by heads / kv_heads consecutive query heads; 0: heads (every head its own). w_k and
    /// w_v then have kv_heads·d_head and kv_heads·d_value columns, and a decoding cache (Full)
    /// kv_heads / heads of the bytes.
    Index kv_heads = 0;
    /// Rotary position embeddings of queries and keys (RoPE; attention/rotary.hpp), applied
    /// in the pass that adds the projections' biases; self-attention and decoding only.
    Rotary rotary{};
  };

  explicit MultiHeadAttention(Config config) : config_(resolve(config)), core_(make_core(config_)) {
    rotary_.configure(config_.rotary, d_key());
    const Index dq = heads() * d_key(), dv = heads() * d_value();
    const Index dkv = kv_heads() * d_key(), dvv = kv_heads() * d_value();
    init_weight(wq_, d_model(), dq, 1);
    if (!shared_qk) init_weight(wk_, d_context(), dkv, 2);
    init_weight(wv_, d_context(), dvv, 3);
    init_weight(wo_, dv, d_model(), 4);
    if (config_.bias) {
      bq_.setZero(1, dq);
      if (!shared_qk) bk_.setZero(1, dkv);
      bv_.setZero(1, dvv);
      bo_.setZero(1, d_model());
    }
    zero_grad();
  }

  Index d_model() const { return config_.d_model; }
  Index d_in() const { return config_.d_model; }
  Index d_out() const { return config_.d_model; }
  Index d_context() const { return config_.d_context; }
  Index heads() const { return config_.heads; }
  /// Key/value heads (config kv_heads, or heads).
  Index kv_heads() const { return config_.kv_heads; }
  Index d_key() const { return config_.d_head; }
  Index d_value() const { return config_.d_value; }
  const Config& config() const { return config_; }
  Policy& policy() { return core_.policy(); }
  const Policy& policy() const { return core_.policy(); }
  Core& core() { return core_; }

  /// Whether forward keeps what backward needs.
  void set_training(bool on) {
    training_ = on;
    if (!on) release_activations();
  }
  /// Frees what the last training forward kept (backward then needs a new forward).
  void release_activations() {
    for (Matrix<S>* m : {&q_, &k_, &v_, &a_})
      m->resize(0, 0);
    core_.release_saved();
    held_.set(0);
  }
  bool training() const { return training_; }

  /// Self-attention: y[T × d_model] = MHA(x[T × d_model]).
  void forward(ConstView<S> x, View<S> y, const SequenceShape& shape) {
    run_forward(x, x, y, shape, shape, true);
  }

  /// Cross-attention: queries from x [batch·n_q × d_model], keys and values from
  /// context [batch·n_k × d_context]; key padding from kv_shape.lengths.
  void forward(ConstView<S> x, ConstView<S> context, View<S> y, const SequenceShape& q_shape,
               const SequenceShape& kv_shape) {
    static_assert(!shared_qk,
                  "effattn: a shared-QK policy (LSHAttention) has no cross-attention: its keys "
                  "are its queries. Call forward(x, y, shape).");
    run_forward(x, context, y, q_shape, kv_shape, false);
  }

  /// Incremental decoding of a causal block (FullAttention: a key/value cache; Favor: its
  /// recurrent state; other policies do not compile): start_decoding(batch), then decode(x, y,
  /// decoder) with the next m tokens of each sequence, x [batch·m × d_model] (sequence b at
  /// rows b·m …). y equals the rows of those tokens in a causal forward over the whole
  /// sequences so far (up to rounding). Training state is untouched.
  using Decoder = typename Core::Decoder;
  Decoder start_decoding(Index batch) const { return core_.start_decoding(batch); }
  void decode(ConstView<S> x, View<S> y, Decoder& decoder) {
    constexpr const char* who = "MultiHeadAttention";
    const auto scope = in_use_.enter(who);
    detail::require(x.cols() == d_model(), who, "x",
                    detail::concat("a matrix of ", x.cols(), " columns"),
                    detail::concat("d_model = ", d_model(), " columns"));
    check_size(y, x.rows(), d_model(), "y");
    check_decode(x.rows(), decoder);
    detail::require_disjoint(who, "y", y, "x", x);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    const Index dq = heads() * d_key(), dv = heads() * d_value();
    auto q = ws.matrix<S>(x.rows(), dq), v = ws.matrix<S>(x.rows(), kv_heads() * d_value());
    auto a = ws.matrix<S>(x.rows(), dv);
    auto k = ws.matrix<S>(shared_qk ? 0 : x.rows(), kv_heads() * d_key());
    // The new tokens sit at positions length, length + 1, … of their sequences.
    if (rotary_.enabled()) rotary_.reserve(decoder.length + x.rows() / decoder.batch);
    project_queries_keys(x, x, q, k, x.rows() / decoder.batch, decoder.length);
    project(x, wv_, bv_, v);
    core_.decode(q, shared_qk ? q : k, v, a, decoder);
    y.noalias() = a * wo_;
    if (config_.bias) y.rowwise() += bo_.row(0);
  }

  /// Backward of the last (training) self-attention forward, given the same x: writes dx
  /// and adds to every parameter's gradient.
  void backward(ConstView<S> x, ConstView<S> dy, View<S> dx, const SequenceShape& shape) {
    run_backward(x, x, dy, dx, dx, shape, shape, true);
  }

  /// Backward of the last (training) cross-attention forward: writes dx and d_context.
  void backward(ConstView<S> x, ConstView<S> context, ConstView<S> dy, View<S> dx,
                View<S> d_context, const SequenceShape& q_shape, const SequenceShape& kv_shape) {
    static_assert(!shared_qk,
                  "effattn: a shared-QK policy (LSHAttention) has no cross-attention: its keys "
                  "are its queries. Call backward(x, dy, dx, shape).");
    run_backward(x, context, dy, dx, d_context, q_shape, kv_shape, false);
  }

  /// Calls f(name, value, gradient) for every parameter (Matrix<S>&; biases are 1 × n),
  /// then for the policy's own parameters, if it has any.
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("w_q"), wq_, gwq_);
    if (!shared_qk) f(std::string_view("w_k"), wk_, gwk_);
    f(std::string_view("w_v"), wv_, gwv_);
    f(std::string_view("w_o"), wo_, gwo_);
    if (config_.bias) {
      f(std::string_view("b_q"), bq_, gbq_);
      if (!shared_qk) f(std::string_view("b_k"), bk_, gbk_);
      f(std::string_view("b_v"), bv_, gbv_);
      f(std::string_view("b_o"), bo_, gbo_);
    }
    if constexpr (requires { policy().visit_parameters(f); }) policy().visit_parameters(f);
  }
  /// Calls f("", policy()) when the policy has random state (Favor, LSHAttention): a
  /// checkpoint keeps it under this block's path, and redraw reaches it.
  template <class F>
  void visit_random_state(F&& f) {
    if constexpr (detail::HasRandomState<Policy>) f(std::string_view(""), policy());
  }

  void zero_grad() {
    for (auto [w, g] : {std::pair{&wq_, &gwq_},
                        {&wk_, &gwk_},
                        {&wv_, &gwv_},
                        {&wo_, &gwo_},
                        {&bq_, &gbq_},
                        {&bk_, &gbk_},
                        {&bv_, &gbv_},
                        {&bo_, &gbo_}})
      g->setZero(w->rows(), w->cols());
    if constexpr (requires { policy().zero_grad(); }) policy().zero_grad();
  }

  /// What decode would reject beyond widths: a decoder this block did not make, rows that are
  /// not m ≥ 1 tokens per sequence. Changes nothing (stacks check every block first).
  void check_decode(Index rows, const Decoder& decoder) const { core_.check_decode(rows, decoder); }

  /// What forward (backward) would reject for this self-attention shape beyond widths and
  /// rows: the policy's limits, and for backward a training forward on the same shape and
  /// padding (layers/layer.hpp). Changes nothing.
  void check_call(const SequenceShape& shape, bool backward) const {
    if (!backward) {
      policy().validate(shape.seq, shape.seq, d_key(), d_value(), causal);
      return;
    }
    check_saved(true);
    core_.check_backward(shape, shape);
  }

  std::size_t scratch_peak_bytes() const { return core_.scratch_peak_bytes(); }
  std::size_t scratch_growths() const { return core_.scratch_growths(); }
  void reset_peak() { core_.reset_peak(); }
  /// Bytes of activations the block holds: Q, K, V, merged heads and the policy's Saved.
  std::size_t activation_bytes() const {
    return sizeof(S) * static_cast<std::size_t>(q_.size() + k_.size() + v_.size() + a_.size()) +
           core_.saved_bytes();
  }

 private:
  static Config resolve(Config c) {
    constexpr const char* who = "MultiHeadAttention";
    detail::require(c.d_model > 0, who, "d_model", c.d_model, "at least 1");
    detail::require(c.heads > 0, who, "heads", c.heads, "at least 1");
    if (c.d_head == 0) {
      detail::require(
          c.d_model % c.heads == 0, who, "heads", c.heads,
          detail::concat("a divisor of d_model = ", c.d_model, " (or set d_head explicitly)"));
      c.d_head = c.d_model / c.heads;
    }
    detail::require(c.d_head > 0, who, "d_head", c.d_head, "at least 1 (or 0 for d_model / heads)");
    if (c.d_value == 0) c.d_value = c.d_head;
    detail::require(c.d_value > 0, who, "d_value", c.d_value, "at least 1 (or 0 for d_head)");
    if (c.d_context == 0) c.d_context = c.d_model;
    detail::require(c.d_context > 0, who, "d_context", c.d_context,
                    "at least 1 (or 0 for d_model)");
    detail::check_masking(c.masking, who);
    c.rotary.validate(c.d_head, who);
    // A core of its own (effattn/mpi/) shards the sequence: rotations would need each shard's
    // global positions.
    if constexpr (!std::is_same_v<Core, AttentionCore<Policy, Masking>>)
      detail::require(!c.rotary.enabled, who, "rotary", "enabled with a sequence-parallel policy",
                      "rotary positions with a block that is not sequence-parallel (not yet "
                      "supported there)");
    if (c.kv_heads == 0) c.kv_heads = c.heads;
    detail::require(c.kv_heads > 0 && c.heads % c.kv_heads == 0, who, "kv_heads", c.kv_heads,
                    detail::concat("a divisor of heads = ", c.heads,
                                   " (key/value heads, each shared by a group of query heads), or "
                                   "0 for heads"));
    if constexpr (shared_qk)
      detail::require(c.kv_heads == c.heads, who, "kv_heads", c.kv_heads,
                      detail::concat(c.heads, " (or 0): ", Policy::name,
                                     " shares QK, so its keys are its queries' heads"));
    return c;
  }

  // The block's core; a core of its own (effattn/mpi/) takes no masking value: it refuses
  // windows, the only maskings that have one.
  static Core make_core(const Config& c) {
    const HeadLayout layout{c.heads, c.d_head, c.d_value, c.seed, c.kv_heads};
    if constexpr (std::is_constructible_v<Core, typename Policy::Config, HeadLayout, Masking>)
      return Core(c.policy, layout, c.masking);
    else
      return Core(c.policy, layout);
  }

  void init_weight(Matrix<S>& w, Index rows, Index cols, std::uint64_t stream) const {
    w.resize(rows, cols);
    CounterRng(config_.seed, stream).fill_normal(w, 1.0 / std::sqrt(double(rows)));
  }

  template <class M>
  static void check_size(const M& m, Index rows, Index cols, const char* name) {
    detail::require(m.rows() == rows && m.cols() == cols, "MultiHeadAttention", name,
                    detail::concat("a ", m.rows(), "×", m.cols(), " matrix"),
                    detail::concat("a ", rows, "×", cols, " matrix"));
  }

  void check_inputs(ConstView<S> x, ConstView<S> context, const SequenceShape& q_shape,
                    const SequenceShape& kv_shape, bool self) const {
    constexpr const char* who = "MultiHeadAttention";
    detail::require(x.cols() == d_model(), who, "x",
                    detail::concat("a matrix of ", x.cols(), " columns"),
                    detail::concat("d_model = ", d_model(), " columns"));
    q_shape.validate_rows(who, self ? "shape" : "q_shape", "x", x.rows());
    if (self) return;
    detail::require(!rotary_.enabled(), who, "rotary", "enabled in a cross-attention call",
                    "self-attention (queries and keys of one sequence share its positions)");
    detail::require(context.cols() == d_context(), who, "context",
                    detail::concat("a matrix of ", context.cols(), " columns"),
                    detail::concat("d_context = ", d_context(), " columns"));
    kv_shape.validate_rows(who, "kv_shape", "context", context.rows());
    detail::require(kv_shape.batch == q_shape.batch, who, "kv_shape.batch", kv_shape.batch,
                    detail::concat("the query batch, ", q_shape.batch));
  }

  void check_saved(bool self) const {
    detail::require(training_ && core_.has_saved(), "MultiHeadAttention", "backward",
                    "called without a preceding training forward",
                    "set_training(true), then forward, then backward");
    detail::require(last_self_ == self, "MultiHeadAttention", "backward",
                    self ? "self-attention after a cross-attention forward"
                         : "cross-attention after a self-attention forward",
                    "the same kind of call as the forward");
  }

  // Runs a call's checks. A sequence-parallel core (effattn/mpi/) runs them on every rank
  // together and compares the ranks' configurations, so that a call one rank rejects throws on
  // every rank before any data moves; any other core just runs them.
  template <class Checks>
  void agreed(Checks&& checks) const {
    using Layer = std::array<std::int64_t, 3>;
    if constexpr (requires { core_.agree(Layer{}, checks); }) {
      core_.agree(Layer{config_.d_model, config_.d_context, config_.bias ? 1 : 0}, checks);
    } else {
      checks();
    }
  }

  static void project(ConstView<S> in, const Matrix<S>& w, const Matrix<S>& b, View<S> out) {
    out.noalias() = in * w;
    if (b.size() > 0) out.rowwise() += b.row(0);
  }

  // Q (and K) from their inputs; with rotary positions the pass that adds the biases rotates
  // them too, row r at position first + r % seq.
  void project_queries_keys(ConstView<S> x, ConstView<S> context, View<S> q, View<S> k, Index seq,
                            Index first) const {
    if (!rotary_.enabled()) {
      project(x, wq_, bq_, q);
      if (!shared_qk) project(context, wk_, bk_, k);
      return;
    }
    q.noalias() = x * wq_;
    rotary_.apply(q, bq_, heads(), d_key(), seq, first, false);
    if (!shared_qk) {
      k.noalias() = context * wk_;
      rotary_.apply(k, bk_, kv_heads(), d_key(), seq, first, false);
    }
  }

  // A training forward's buffer is a member kept for backward; otherwise it is scratch.
  View<S> buffer(Matrix<S>& member, Workspace& ws, Index rows, Index cols) const {
    if (!training_) return ws.matrix<S>(rows, cols);
    member.resize(rows, cols);
    return member;
  }

  void run_forward(ConstView<S> x, ConstView<S> context, View<S> y, const SequenceShape& q_shape,
                   const SequenceShape& kv_shape, bool self) {
    constexpr const char* who = "MultiHeadAttention";
    const auto scope = in_use_.enter(who);
    // Every check before the first write: a rejected call must leave the state of the last
    // training forward intact for its backward.
    agreed([&] {
      check_inputs(x, context, q_shape, kv_shape, self);
      check_size(y, x.rows(), d_model(), "y");
      detail::require_disjoint(who, "y", y, "x", x);
      if (!self) detail::require_disjoint(who, "y", y, "context", context);
      policy().validate(q_shape.seq, kv_shape.seq, d_key(), d_value(), causal);
    });
    if (rotary_.enabled()) rotary_.reserve(q_shape.seq);
    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    const Index dq = heads() * d_key(), dv = heads() * d_value();
    View<S> q = buffer(q_, ws, x.rows(), dq);
    View<S> k = shared_qk ? q : buffer(k_, ws, context.rows(), kv_heads() * d_key());
    View<S> v = buffer(v_, ws, context.rows(), kv_heads() * d_value());
    View<S> a = buffer(a_, ws, x.rows(), dv);
    project_queries_keys(x, context, q, k, q_shape.seq, 0);
    project(context, wv_, bv_, v);
    // Padded rows attend and are attended to as zeros, whatever x holds there.
    q_shape.zero_padding(q);
    if (!shared_qk) kv_shape.zero_padding(k);
    kv_shape.zero_padding(v);
    core_.forward(q, k, v, a, q_shape, kv_shape, training_);
    y.noalias() = a * wo_;
    if (config_.bias) y.rowwise() += bo_.row(0);
    last_self_ = self;
    held_.set(training_ ? activation_bytes() : 0);
  }

  void run_backward(ConstView<S> x, ConstView<S> context, ConstView<S> dy, View<S> dx,
                    View<S> d_context, const SequenceShape& q_shape, const SequenceShape& kv_shape,
                    bool self) {
    constexpr const char* who = "MultiHeadAttention";
    const auto scope = in_use_.enter(who);
    agreed([&] {
      check_saved(self);
      check_inputs(x, context, q_shape, kv_shape, self);
      core_.check_backward(q_shape, kv_shape);
      check_size(dy, x.rows(), d_model(), "dy");
      check_size(dx, x.rows(), d_model(), "dx");
      detail::require_disjoint(who, "dx", dx, "x", x);
      detail::require_disjoint(who, "dx", dx, "dy", dy);
      if (!self) {
        check_size(d_context, context.rows(), config_.d_context, "d_context");
        detail::require_disjoint(who, "dx", dx, "context", context);
        for (auto [name, m] : {std::pair{"x", x}, {"context", context}, {"dy", dy}})
          detail::require_disjoint(who, "d_context", d_context, name, m);
        detail::require_disjoint(who, "d_context", d_context, "dx", dx);
      }
    });

    Workspace& ws = layer_workspace();
    const Workspace::Frame frame(ws);
    const Matrix<S>& keys = shared_qk ? q_ : k_;
    auto da = ws.matrix<S>(a_.rows(), a_.cols());
    auto dq = ws.matrix<S>(q_.rows(), q_.cols());
    auto dk = ws.matrix<S>(keys.rows(), keys.cols());
    auto dv = ws.matrix<S>(v_.rows(), v_.cols());
    da.noalias() = dy * wo_.transpose();
    q_shape.zero_padding(da);  // the dy of padded rows is ignored
    core_.backward(q_, keys, v_, a_, da, dq, dk, dv, q_shape, kv_shape);
    // The forward set padded rows of q, k, v to 0: no gradient flows through them.
    q_shape.zero_padding(dq);
    kv_shape.zero_padding(dk);
    kv_shape.zero_padding(dv);
    if (shared_qk) dq += dk;  // the queries were the keys too
    if (rotary_.enabled()) {  // back through the rotations: by −pθ
      const Matrix<S> none;
      rotary_.apply(dq, none, heads(), d_key(), q_shape.seq, 0, true);
      if (!shared_qk) rotary_.apply(dk, none, kv_heads(), d_key(), kv_shape.seq, 0, true);
    }

    add_projection_grads(a_, dy, gwo_, gbo_, q_shape);
    add_projection_grads(x, dq, gwq_, gbq_, q_shape);
    if (!shared_qk) add_projection_grads(context, dk, gwk_, gbk_, kv_shape);
    add_projection_grads(context, dv, gwv_, gbv_, kv_shape);
    dx.noalias() = dq * wq_.transpose();
    View<S> dc = self ? dx : d_context;  // keys and values came from x or from the context
    if (!shared_qk) {
      if (!self)
        dc.noalias() = dk * wk_.transpose();
      else
        dc.noalias() += dk * wk_.transpose();
    }
    dc.noalias() += dv * wv_.transpose();
  }

  // Over the valid rows only: a padded row reaches no gradient.
  void add_projection_grads(ConstView<S> in, ConstView<S> d_out, Matrix<S>& gw, Matrix<S>& gb,
                            const SequenceShape& shape) const {
    detail::add_weight_gradient(gw, in, d_out, shape);
    if (config_.bias) detail::add_bias_gradient(gb, d_out, shape);
  }

  Config config_;
  Core core_;
  Matrix<S> wq_, wk_, wv_, wo_, bq_, bk_, bv_, bo_;
  Matrix<S> gwq_, gwk_, gwv_, gwo_, gbq_, gbk_, gbv_, gbo_;
  Matrix<S> q_, k_, v_, a_;  // kept by a training forward for backward
  detail::RotaryTable<S> rotary_;
  HeldActivations held_;
  bool training_ = false;
  bool last_self_ = true;
  detail::ExclusiveUse in_use_;
};

}  // namespace effattn

#pragma once
// Softmax cross-entropy over a vocabulary: on given logits, or chunked through an output head
// so that the tokens × vocab logits never exist at once (the Reformer's chunked output layer).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "effattn/core/aliasing.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/layer.hpp"
#include "effattn/layers/layer_workspace.hpp"

namespace effattn {

/// Settings of the cross-entropy functions below.
struct CrossEntropyConfig {
  std::int32_t ignore_index = -100;  ///< targets equal to it count for nothing (as PyTorch)
  double label_smoothing = 0;        ///< ε: the target is (1 − ε)·one-hot + ε/vocab
  Index chunk = 512;                 ///< tokens per chunk of logits (chunked form)
};

/// What a cross-entropy call measured: the summed loss over the `counted` tokens (targets
/// not ignored) and how many of them the logits ranked first (argmax = target; ties go to
/// the lower id).
struct CrossEntropy {
  double sum = 0;
  Index counted = 0;
  Index correct = 0;
  /// The mean loss over the counted tokens (0 when none counted).
  double mean() const { return counted > 0 ? sum / double(counted) : 0.0; }
  double accuracy() const { return counted > 0 ? double(correct) / double(counted) : 0.0; }
};

namespace detail {

inline Index checked_targets(const char* who, std::span<const std::int32_t> targets, Index vocab,
                             const CrossEntropyConfig& config) {
  require(std::isfinite(config.label_smoothing) && config.label_smoothing >= 0 &&
              config.label_smoothing < 1,
          who, "label_smoothing", config.label_smoothing, "a value in [0, 1)");
  Index counted = 0;
  for (std::size_t t = 0; t < targets.size(); ++t) {
    const std::int32_t y = targets[t];
    if (y == config.ignore_index) continue;
    require(y >= 0 && y < vocab, who, concat("targets[", t, "]"), y,
            concat("a token id in [0, ", vocab, ") or the ignore_index ", config.ignore_index));
    ++counted;
  }
  return counted;
}

// Loss of each row of `logits` against its target; d (which may be `logits` itself) gets
// (softmax − target distribution) / normaliser, or 0 for an ignored row. Targets are checked.
template <class S, class D>
CrossEntropy cross_entropy_rows(ConstView<S> logits, std::span<const std::int32_t> targets, D* d,
                                const CrossEntropyConfig& config, double normaliser) {
  CrossEntropy out;
  const Index vocab = logits.cols();
  const double eps = config.label_smoothing, off = eps / double(vocab), on = 1 - eps + off;
  for (Index r = 0; r < logits.rows(); ++r) {
    const std::int32_t y = targets[std::size_t(r)];
    if (y == config.ignore_index) {
      if (d) d->row(r).setZero();
      continue;
    }
    const S* z = logits.data() + r * logits.outerStride();
    Index best = 0;
    double sum_z = 0;
    for (Index j = 0; j < vocab; ++j) {
      best = z[j] > z[best] ? j : best;
      sum_z += double(z[j]);
    }
    const double m = double(z[best]);
    double sum_exp = 0;
    for (Index j = 0; j < vocab; ++j)
      sum_exp += std::exp(double(z[j]) - m);
    const double lse = m + std::log(sum_exp);
    out.sum += lse - (1 - eps) * double(z[y]) - off * sum_z;
    out.correct += best == y;
    ++out.counted;
    if (d) {
      const double scale = 1 / normaliser;
      S* g = &(*d)(r, 0);
      for (Index j = 0; j < vocab; ++j)  // reads z[j] before writing g[j]: in place is fine
        g[j] = S((std::exp(double(z[j]) - lse) - (j == y ? on : off)) * scale);
    }
  }
  return out;
}

}  // namespace detail

/// Softmax cross-entropy of each row of `logits` (tokens × vocab) against `targets`, summed
/// over the rows whose target is not config.ignore_index, with d_logits = ∂(mean loss)/∂logits
/// (the mean over this call's counted rows; pass `normaliser` > 0 to divide by another count,
/// e.g. the tokens of a whole batch). d_logits may be `logits` itself (overwritten) or memory
/// of its own. A target outside [0, vocab) is an effattn::Error naming its position, raised
/// before anything is written.
template <class S>
CrossEntropy softmax_cross_entropy(ConstView<S> logits, std::span<const std::int32_t> targets,
                                   View<S> d_logits, const CrossEntropyConfig& config = {},
                                   double normaliser = 0) {
  constexpr const char* who = "softmax_cross_entropy";
  detail::require(Index(targets.size()) == logits.rows(), who, "targets",
                  detail::concat(targets.size(), " targets"),
                  detail::concat("one per row of logits (", logits.rows(), ")"));
  detail::require(logits.cols() > 0, who, "logits", "a matrix of 0 columns", "one per token id");
  detail::require_matrix(who, "d_logits", d_logits, logits.rows(), logits.cols());
  const bool in_place =
      d_logits.data() == logits.data() && d_logits.outerStride() == logits.outerStride();
  if (!in_place) detail::require_disjoint(who, "d_logits", d_logits, "logits", logits);
  detail::require(std::isfinite(normaliser) && normaliser >= 0, who, "normaliser", normaliser,
                  "a count > 0, or 0 for this call's counted rows");
  const Index counted = detail::checked_targets(who, targets, logits.cols(), config);
  const double n = normaliser > 0 ? normaliser : double(std::max<Index>(counted, 1));
  return detail::cross_entropy_rows<S>(logits, targets, &d_logits, config, n);
}

/// The same loss without gradients (evaluation).
template <class S>
CrossEntropy softmax_cross_entropy(ConstView<S> logits, std::span<const std::int32_t> targets,
                                   const CrossEntropyConfig& config = {}) {
  constexpr const char* who = "softmax_cross_entropy";
  detail::require(Index(targets.size()) == logits.rows(), who, "targets",
                  detail::concat(targets.size(), " targets"),
                  detail::concat("one per row of logits (", logits.rows(), ")"));
  detail::checked_targets(who, targets, logits.cols(), config);
  return detail::cross_entropy_rows<S, View<S>>(logits, targets, nullptr, config, 1);
}

namespace detail {

// The chunked loss; with d_hidden, its gradient too.
template <class Head>
CrossEntropy chunked_loss(ConstView<typename Head::Scalar> hidden, Head& head,
                          std::span<const std::int32_t> targets,
                          View<typename Head::Scalar>* d_hidden, const CrossEntropyConfig& config) {
  using S = typename Head::Scalar;
  constexpr const char* who = "chunked_cross_entropy";
  static_assert(Head::position_wise,
                "effattn: chunked_cross_entropy needs a position-wise head (each token's logits "
                "from its own hidden row), e.g. Linear");
  require(Index(targets.size()) == hidden.rows(), who, "targets",
          concat(targets.size(), " targets"),
          concat("one per row of hidden (", hidden.rows(), ")"));
  require(hidden.cols() == head.d_in(), who, "hidden",
          concat("a matrix of ", hidden.cols(), " columns"),
          concat("the head's d_in = ", head.d_in(), " columns"));
  if (d_hidden) {
    require_matrix(who, "d_hidden", *d_hidden, hidden.rows(), hidden.cols());
    require_disjoint(who, "d_hidden", *d_hidden, "hidden", hidden);
  }
  require(config.chunk > 0, who, "chunk", config.chunk, "at least 1 token");
  const Index counted = checked_targets(who, targets, head.d_out(), config);
  const double n = double(std::max<Index>(counted, 1));
  Workspace& ws = layer_workspace();
  const Workspace::Frame frame(ws);
  auto logits =
      ws.matrix<S>(std::min(config.chunk, std::max<Index>(hidden.rows(), 1)), head.d_out());
  CrossEntropy total;
  for (Index t0 = 0; t0 < hidden.rows(); t0 += config.chunk) {
    const Index m = std::min(config.chunk, hidden.rows() - t0);
    const SequenceShape shape{1, m, {}};
    auto z = logits.topRows(m);
    head.forward(hidden.middleRows(t0, m), z, shape);
    const auto part = cross_entropy_rows<S>(z, targets.subspan(std::size_t(t0), std::size_t(m)),
                                            d_hidden ? &z : nullptr, config, n);
    total.sum += part.sum;
    total.counted += part.counted;
    total.correct += part.correct;
    if (d_hidden) head.backward(hidden.middleRows(t0, m), z, d_hidden->middleRows(t0, m), shape);
  }
  return total;
}

}  // namespace detail

/// Cross-entropy of `head`'s outputs (a position-wise Layer from d_model to vocab, e.g.
/// Linear) on the rows of `hidden`, config.chunk tokens at a time: each chunk's logits are
/// made, turned into their gradient in place and sent back through head.backward, so at most
/// chunk × vocab logits exist (in the layer workspace) however long the sequence. d_hidden
/// gets ∂(mean loss)/∂hidden and the head's parameter gradients are added to; the mean is over
/// the counted tokens of the whole call. A head that keeps activations must be in training
/// mode. Targets are checked before anything is computed.
template <Layer Head>
CrossEntropy chunked_cross_entropy(ConstView<typename Head::Scalar> hidden, Head& head,
                                   std::span<const std::int32_t> targets,
                                   View<typename Head::Scalar> d_hidden,
                                   const CrossEntropyConfig& config = {}) {
  return detail::chunked_loss(hidden, head, targets, &d_hidden, config);
}

/// The same loss without gradients (evaluation): chunk × vocab logits at a time.
template <Layer Head>
CrossEntropy chunked_cross_entropy(ConstView<typename Head::Scalar> hidden, Head& head,
                                   std::span<const std::int32_t> targets,
                                   const CrossEntropyConfig& config = {}) {
  return detail::chunked_loss(hidden, head, targets, nullptr, config);
}

}  // namespace effattn

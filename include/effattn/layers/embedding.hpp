#pragma once
// Embedding: token ids to vectors, the input of a language model, with sparse gradients.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "effattn/core/counter_rng.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/sequence_shape.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/checks.hpp"

namespace effattn {

/// y.row(t) = table.row(ids[t]), table ∈ ℝ^{vocab × d_model} drawn from N(0, 1) (as
/// torch.nn.Embedding; parameter `table`). Not a Layer, since its input is ids, not vectors:
/// it starts a model, whose first Layer takes y. backward adds dy's rows to the gradient rows
/// of the ids seen, and zero_grad clears only those rows, so a step costs O(tokens · d_model),
/// not O(vocab · d_model), in the embedding (an optimiser still visits the whole table).
/// An id outside [0, vocab) is an effattn::Error naming its position, raised before anything
/// is written.
template <class S = float>
class Embedding {
 public:
  using Scalar = S;
  struct Config {
    Index vocab = 256;
    Index d_model = 512;
    std::uint64_t seed = 0;
  };

  explicit Embedding(Config config) : config_(config) {
    detail::require(config.vocab > 0, "Embedding", "vocab", config.vocab, "at least 1");
    detail::require(config.d_model > 0, "Embedding", "d_model", config.d_model, "at least 1");
    table_.resize(config.vocab, config.d_model);
    CounterRng(config.seed, 1).fill_normal(table_);
    grad_.setZero(config.vocab, config.d_model);
  }

  Index vocab() const { return config_.vocab; }
  Index d_model() const { return config_.d_model; }
  const Config& config() const { return config_; }
  const Matrix<S>& table() const { return table_; }

  /// y = the rows of `ids` (ids.size() × d_model).
  void forward(std::span<const std::int32_t> ids, View<S> y) const {
    check(ids);
    detail::require_matrix("Embedding", "y", y, Index(ids.size()), config_.d_model);
    for (std::size_t t = 0; t < ids.size(); ++t)
      y.row(Index(t)) = table_.row(ids[t]);
  }

  /// Adds dy's rows to the gradient rows of `ids` (ids as in the forward).
  void backward(std::span<const std::int32_t> ids, ConstView<S> dy) {
    check(ids);
    detail::require_matrix("Embedding", "dy", dy, Index(ids.size()), config_.d_model);
    add_rows(ids, dy, 0, Index(ids.size()));
  }
  /// The same for the valid rows of `shape` only: padded positions reach no gradient,
  /// whatever dy holds there.
  void backward(std::span<const std::int32_t> ids, ConstView<S> dy, const SequenceShape& shape) {
    check(ids);
    detail::require_matrix("Embedding", "dy", dy, Index(ids.size()), config_.d_model);
    shape.validate_rows("Embedding", "shape", "ids", Index(ids.size()));
    shape.for_each_valid_run([&](Index r0, Index rows) { add_rows(ids, dy, r0, rows); });
  }

 private:
  void add_rows(std::span<const std::int32_t> ids, ConstView<S> dy, Index r0, Index rows) {
    for (Index t = r0; t < r0 + rows; ++t) {
      const auto id = ids[std::size_t(t)];
      if (!touched_all_) touched_.push_back(id);
      grad_.row(id) += dy.row(t);
    }
    if (Index(touched_.size()) > config_.vocab) {  // clearing everything is cheaper now
      touched_all_ = true;
      touched_.clear();
    }
  }

 public:
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("table"), table_, grad_);
  }
  /// The table's gradient for a writer that may touch any row (a tied output head,
  /// layers/linear.hpp): the next zero_grad clears every row.
  Matrix<S>& dense_gradient() {
    touched_all_ = true;
    touched_.clear();
    return grad_;
  }
  /// Clears the gradient rows backward has added to since the last zero_grad (all rows once
  /// it has seen more tokens than the vocabulary holds). Other rows stay zero unless
  /// something writes them through visit_parameters (scaling, as clip_grad_norm does, keeps
  /// them zero).
  void zero_grad() {
    if (touched_all_)
      grad_.setZero();
    else
      for (const std::int32_t id : touched_)
        grad_.row(id).setZero();
    touched_.clear();
    touched_all_ = false;
  }

 private:
  void check(std::span<const std::int32_t> ids) const {
    for (std::size_t t = 0; t < ids.size(); ++t)
      detail::require(ids[t] >= 0 && ids[t] < config_.vocab, "Embedding",
                      detail::concat("ids[", t, "]"), ids[t],
                      detail::concat("a token id in [0, ", config_.vocab, ")"));
  }

  Config config_;
  Matrix<S> table_, grad_;
  std::vector<std::int32_t> touched_;
  bool touched_all_ = false;
};

}  // namespace effattn

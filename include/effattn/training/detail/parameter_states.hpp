#pragma once
// What every optimiser shares: the parameters of a step, gathered and checked before anything
// changes, and per-parameter state keyed by parameter path.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"

namespace effattn::detail {

/// One parameter of a step: its path (owned), value and gradient.
template <class S>
struct StepParameter {
  std::string path;
  Matrix<S>* value;
  Matrix<S>* gradient;
};

/// The most steps an optimiser's state may count: exact in double (the bias corrections take
/// β^t), and far from std::int64_t's overflow.
inline constexpr std::int64_t kMaxOptimizerSteps = std::int64_t(1) << 53;

inline std::string shape_text(Index rows, Index cols) {
  return concat(rows, "×", cols);
}

/// The parameters of `models` (anything with visit_parameters(f)), in visiting order, checked:
/// every gradient shaped as its value, and no path twice (two models passed to one step must
/// name their parameters apart). Throws before anything is changed.
template <class S, class... Models>
std::vector<StepParameter<S>> step_parameters(std::string_view who, Models&... models) {
  std::vector<StepParameter<S>> all;
  auto collect = [&](std::string_view path, auto& value, auto& gradient) {
    static_assert(std::is_same_v<std::decay_t<decltype(value)>, Matrix<S>>,
                  "effattn: an optimiser of one scalar type steps models of that type only");
    all.push_back({std::string(path), &value, &gradient});
  };
  (models.visit_parameters(collect), ...);
  for (const auto& p : all)
    require(p.gradient->rows() == p.value->rows() && p.gradient->cols() == p.value->cols(), who,
            concat("gradient of ", p.path), shape_text(p.gradient->rows(), p.gradient->cols()),
            concat("the shape of the parameter, ", shape_text(p.value->rows(), p.value->cols())));
  // A non-finite gradient would make every later step NaN: refused, nothing changed (find
  // it first with grad_norm or clip_grad_norm, and skip the step, as loss scaling does).
  for (const auto& p : all)
    require(p.gradient->allFinite(), who, concat("gradient of ", p.path), "not finite (NaN or ∞)",
            "finite gradients (skip this step: see clip_grad_norm's error_if_nonfinite)");
  std::vector<const std::string*> paths;
  paths.reserve(all.size());
  for (const auto& p : all)
    paths.push_back(&p.path);
  std::sort(paths.begin(), paths.end(), [](auto* a, auto* b) { return *a < *b; });
  const auto twice =
      std::adjacent_find(paths.begin(), paths.end(), [](auto* a, auto* b) { return *a == *b; });
  require(twice == paths.end(), who, "parameters",
          concat("two parameters named '", twice == paths.end() ? "" : **twice, "'"),
          "one path per parameter (models stepped together must name their parameters apart)");
  return all;
}

/// An optimiser's state: for each parameter path, `slots` matrices shaped as the parameter
/// (zero when made) and the number of steps taken.
template <class S>
class ParameterStates {
 public:
  struct Entry {
    std::vector<Matrix<S>> slots;
    std::int64_t steps = 0;
  };

  ParameterStates(std::string_view who, int slots) : who_(who), slots_(slots) {}

  /// The entries of `params` (made where missing), after checking that existing ones are
  /// shaped as their parameters; throws before anything is made or changed.
  std::vector<Entry*> entries(const std::vector<StepParameter<S>>& params) {
    for (const auto& p : params) {
      const auto it = entries_.find(p.path);
      if (it == entries_.end()) continue;
      require(it->second.steps < kMaxOptimizerSteps, who_, concat("parameter '", p.path, "'"),
              concat(it->second.steps, " steps taken"),
              concat("fewer than ", kMaxOptimizerSteps, " steps"));
      if (it->second.slots.empty()) continue;
      const Matrix<S>& slot = it->second.slots.front();
      require(slot.rows() == p.value->rows() && slot.cols() == p.value->cols(), who_,
              concat("parameter '", p.path, "'"), shape_text(p.value->rows(), p.value->cols()),
              concat(shape_text(slot.rows(), slot.cols()),
                     ", the shape its optimiser state was made for (reset() the optimiser to "
                     "step a different model)"));
    }
    std::vector<Entry*> out;
    out.reserve(params.size());
    for (const auto& p : params) {
      auto it = entries_.find(p.path);
      if (it == entries_.end()) {
        Entry e;
        e.slots.assign(static_cast<std::size_t>(slots_),
                       Matrix<S>::Zero(p.value->rows(), p.value->cols()));
        it = entries_.emplace(p.path, std::move(e)).first;
      }
      out.push_back(&it->second);
    }
    return out;
  }

  void clear() { entries_.clear(); }
  int slots() const { return slots_; }
  const std::map<std::string, Entry, std::less<>>& all() const { return entries_; }
  /// Replaces every entry (checked by the caller).
  void replace(std::map<std::string, Entry, std::less<>> entries) { entries_ = std::move(entries); }
  std::size_t size() const { return entries_.size(); }
  const Entry* find(std::string_view path) const {
    const auto it = entries_.find(path);
    return it == entries_.end() ? nullptr : &it->second;
  }
  std::size_t bytes() const {
    std::size_t b = 0;
    for (const auto& [path, e] : entries_)
      for (const auto& s : e.slots)
        b += sizeof(S) * static_cast<std::size_t>(s.size());
    return b;
  }

 private:
  std::string who_;
  int slots_;
  std::map<std::string, Entry, std::less<>> entries_;
};

/// What every optimiser offers about its state: reset(), state_bytes(), steps(path), and
/// reading and replacing all of it (checkpoints: training/safetensors.hpp).
template <class S>
class OptimizerState {
 public:
  /// One parameter's state: its step count and one matrix per slot_names() entry.
  using Entry = typename ParameterStates<S>::Entry;
  using Entries = std::map<std::string, Entry, std::less<>>;

  /// Every parameter's state, by path.
  const Entries& state() const { return states_.all(); }
  /// Replaces the whole state by `entries`: each must have one matrix per slot name, all of
  /// one shape, and steps ≥ 0; otherwise an effattn::Error and nothing changes. Shapes are
  /// checked against the parameters at the next step.
  void set_state(Entries entries) {
    for (const auto& [path, e] : entries) {
      require(e.steps >= 0 && e.steps <= kMaxOptimizerSteps, who_, concat("state of '", path, "'"),
              concat(e.steps, " steps"), concat("a step count from 0 to ", kMaxOptimizerSteps));
      require(Index(e.slots.size()) == states_.slots(), who_, concat("state of '", path, "'"),
              concat(e.slots.size(), " tensors"), concat(states_.slots(), " (one per slot)"));
      for (const auto& m : e.slots)
        require(m.rows() == e.slots.front().rows() && m.cols() == e.slots.front().cols(), who_,
                concat("state of '", path, "'"), "tensors of different shapes",
                "one shape for all of a parameter's state");
      for (const auto& m : e.slots)
        require(m.allFinite(), who_, concat("state of '", path, "'"), "not finite (NaN or ∞)",
                "finite optimiser state");
    }
    states_.replace(std::move(entries));
  }

  /// Forgets every parameter's state (the next step is every parameter's first).
  void reset() { states_.clear(); }
  /// Bytes of state held (Sgd: a momentum buffer per parameter when momentum > 0; Adam: two
  /// moments).
  std::size_t state_bytes() const { return states_.bytes(); }
  /// Steps taken by the parameter at `path` (0 if it was never stepped).
  std::int64_t steps(std::string_view path) const {
    const auto* e = states_.find(path);
    return e ? e->steps : 0;
  }

 protected:
  OptimizerState(std::string_view who, int slots) : states_(who, slots), who_(who) {}
  ParameterStates<S> states_;
  std::string who_;
};

/// Checks a learning rate: finite and ≥ 0.
inline void require_learning_rate(std::string_view who, double lr) {
  require(std::isfinite(lr) && lr >= 0, who, "lr", lr, "a finite learning rate ≥ 0");
}

}  // namespace effattn::detail

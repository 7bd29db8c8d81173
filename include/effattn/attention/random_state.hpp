#pragma once
// RandomState: the random draws that define a policy's function, as a checkpoint holds them.

#include <concepts>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "effattn/core/types.hpp"

namespace effattn {

/// What a policy drew at random and computes with (Favor's random features, LSHAttention's
/// rotations): the seed its draws come from, if they are drawn lazily from one, and the tensors
/// by name (relative to the policy). safetensors::save writes it beside the parameters and
/// load restores it, so that a saved model computes the same function after a redraw; redraw
/// (layers/redraw.hpp) draws it anew in every policy of a model. A policy with random state
/// has random_state(), check_random_state(state) (why it cannot take a state, or "") and
/// set_random_state(state), claims_random_tensor(name), and redraw(seed).
template <class S>
struct RandomState {
  std::optional<std::uint64_t> seed;
  std::vector<std::pair<std::string, Matrix<S>>> tensors;
};

namespace detail {
/// Whether P has random state that a checkpoint must hold.
template <class P>
concept HasRandomState = requires(P& p, const P& cp) {
  cp.random_state();
  cp.check_random_state(cp.random_state());
  p.set_random_state(cp.random_state());
  { cp.claims_random_tensor(std::string()) } -> std::convertible_to<bool>;
  p.redraw(std::uint64_t{});
};
}  // namespace detail

}  // namespace effattn

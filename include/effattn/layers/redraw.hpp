#pragma once
// redraw(model, seed): new random features and rotations in every attention policy of a model.

#include <cstdint>
#include <string_view>

#include "effattn/core/counter_rng.hpp"
#include "effattn/layers/detail/composition.hpp"

namespace effattn {

namespace detail {
/// The seed a policy at `path` draws from when its model is redrawn from `seed`: the first 64
/// random bits of stream FNV-1a(path) under `seed`, so that blocks draw apart and the same
/// (seed, path) always draws the same.
inline std::uint64_t seed_for_path(std::uint64_t seed, std::string_view path) {
  std::uint64_t stream = 0xcbf29ce484222325ull;  // FNV-1a, 64 bits
  for (const char c : path)
    stream = (stream ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  const auto bits = CounterRng(seed, stream).bits(0);
  return (static_cast<std::uint64_t>(bits[1]) << 32) | bits[0];
}
}  // namespace detail

/// Draws the random state of every attention policy in `model` anew: Favor's random features
/// (Performer's redraw, every so many training steps) and LSHAttention's rotations, each from
/// `seed` and the policy's path (detail::seed_for_path), so two blocks never share a draw and
/// the same seed gives the same model. Rotations fixed by hand are dropped. A model without
/// such policies is left as it was. safetensors::save keeps what was drawn.
template <class Model>
void redraw(Model& model, std::uint64_t seed) {
  auto draw = [&](std::string_view path, auto& policy) {
    policy.redraw(detail::seed_for_path(seed, path));
  };
  detail::visit_random_state_of(model, "", draw);
}

}  // namespace effattn

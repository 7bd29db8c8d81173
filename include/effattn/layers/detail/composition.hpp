#pragma once
// What composing layers share: seeding sub-layers apart, naming their parameters, and the
// Wrapper and Stateless bases.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "effattn/core/sequence_shape.hpp"
#include "effattn/layers/detail/checks.hpp"
#include "effattn/layers/layer.hpp"

namespace effattn::detail {

/// A sub-layer's config with its seed moved to an independent stream: a Config with a
/// `seed` gets a mixed seed, a composite Config (with `reseeded(salt)`) passes the salt
/// on, and a Config with neither (no randomness) is returned as it is.
inline std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t salt) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (salt + 1);  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
template <class C>
C reseed(C config, std::uint64_t salt) {
  if constexpr (requires { config.reseeded(salt); })
    return config.reseeded(salt);
  else if constexpr (requires { config.seed = std::uint64_t{}; }) {
    config.seed = mix_seed(config.seed, salt);
    return config;
  } else
    return config;
}

/// The group under which a layer that holds L beside something else (PreNorm: the norm and
/// the layer) files L's parameters: L::parameter_group ("attention", "feed_forward", "norm";
/// a wrapper passes on its layer's), or "layer" for a type without one.
template <class L>
constexpr std::string_view parameter_group() {
  if constexpr (requires { L::parameter_group; })
    return L::parameter_group;
  else
    return "layer";
}

/// Visits a sub-layer's parameters as "<prefix>.<name>".
template <class L, class F>
void visit_prefixed(L& layer, std::string_view prefix, F& f) {
  layer.visit_parameters([&](std::string_view name, auto& value, auto& gradient) {
    std::string full;
    full.reserve(prefix.size() + 1 + name.size());
    full.append(prefix).append(".").append(name);
    f(std::string_view(full), value, gradient);
  });
}

/// A path and a name joined by a dot ("" on either side joins nothing).
inline std::string join_path(std::string_view prefix, std::string_view name) {
  std::string full(prefix);
  if (!prefix.empty() && !name.empty()) full += '.';
  full += name;
  return full;
}

/// Calls f(path, policy) for every attention policy with random state (Favor's features,
/// LSHAttention's rotations) inside `layer`, its path under `prefix`: what a layer's
/// visit_random_state does for the layers it holds (those without any have none to visit).
template <class L, class F>
void visit_random_state_of(L& layer, std::string_view prefix, F& f) {
  if constexpr (requires { layer.visit_random_state(f); })
    layer.visit_random_state([&](std::string_view path, auto& policy) {
      const std::string full = join_path(prefix, path);
      f(std::string_view(full), policy);
    });
}

/// Turns dropout on or off in layer l and in every layer it holds: calls l.set_dropout(on)
/// where l has one (Dropout, and every stack and wrapper, which pass it on).
template <class L>
void propagate_dropout(L& l, bool on) {
  if constexpr (requires { l.set_dropout(on); }) l.set_dropout(on);
}

/// What a layer that wraps one sub-layer (its config field `layer`) forwards to it unchanged.
template <class F>
class Wrapper {
  static_assert(assert_layer<F>());

 public:
  using Scalar = typename F::Scalar;
  F& layer() { return fn_; }
  const F& layer() const { return fn_; }
  void release_activations() { fn_.release_activations(); }
  std::size_t activation_bytes() const { return fn_.activation_bytes(); }
  void zero_grad() { fn_.zero_grad(); }
  void set_dropout(bool on) { detail::propagate_dropout(fn_, on); }
  void check_call(const SequenceShape& shape, bool backward) const {
    detail::check_call(fn_, shape, backward);
  }
  /// Its layer's random state, under the same paths (the wrapper adds no segment).
  template <class V>
  void visit_random_state(V&& f) {
    detail::visit_random_state_of(fn_, "", f);
  }

 protected:
  explicit Wrapper(const typename F::Config& config) : fn_(config) {}
  F fn_;
};

/// A layer without parameters or activations (moving columns around).
class Stateless {
 public:
  void set_training(bool) {}
  void release_activations() {}
  std::size_t activation_bytes() const { return 0; }
  void zero_grad() {}
  template <class F>
  void visit_parameters(F&&) {}
};

}  // namespace effattn::detail

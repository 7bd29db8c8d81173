#pragma once
// Fingerprint: a 63-bit hash of a configuration, compared across ranks before a
// sequence-parallel call moves any data (a rank built with another d_model, seed, feature
// count or shard table is an Error on every rank, not a hang or a silent wrong answer).

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "effattn/core/types.hpp"

namespace effattn::mpi::detail {

class Fingerprint {
 public:
  template <class T>
  requires std::is_arithmetic_v<T> || std::is_enum_v<T> Fingerprint& add(T value) {
    if constexpr (std::is_enum_v<T>)
      mix(static_cast<std::uint64_t>(static_cast<std::underlying_type_t<T>>(value)));
    else if constexpr (std::is_floating_point_v<T>) {
      const double d = static_cast<double>(value);
      std::uint64_t bits;
      std::memcpy(&bits, &d, sizeof bits);
      mix(bits);
    } else
      mix(static_cast<std::uint64_t>(value));
    return *this;
  }
  template <class T>
  Fingerprint& add(const std::optional<T>& value) {
    add(value.has_value());
    if (value) add(*value);
    return *this;
  }
  /// Shape and every value of a dense matrix (random features, rotations).
  template <class S>
  Fingerprint& add_matrix(const Matrix<S>& m) {
    add(m.rows()).add(m.cols());
    for (Index i = 0; i < m.size(); ++i)
      add(m.data()[i]);
    return *this;
  }
  /// Non-negative, so that an all-reduce of (v, −v) with MPI_MAX tells whether all agree.
  std::int64_t value() const { return static_cast<std::int64_t>(h_ >> 1); }

 private:
  void mix(std::uint64_t x) {  // splitmix64's finaliser over the running state
    h_ ^= x + 0x9e3779b97f4a7c15ull + (h_ << 6) + (h_ >> 2);
    h_ ^= h_ >> 30;
    h_ *= 0xbf58476d1ce4e5b9ull;
    h_ ^= h_ >> 27;
    h_ *= 0x94d049bb133111ebull;
    h_ ^= h_ >> 31;
  }
  std::uint64_t h_ = 0x6566666174746e21ull;
};

/// One part of a configuration, named for the error that says which part differs.
struct NamedFingerprint {
  const char* name;
  std::int64_t value;
};

}  // namespace effattn::mpi::detail

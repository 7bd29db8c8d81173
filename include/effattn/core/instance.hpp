#pragma once
// What a stateful object knows of itself: an identity that its decoders record, and a guard
// that turns a second thread's call into an effattn::Error instead of a silent wrong answer.

#include <atomic>
#include <cstdint>

#include "effattn/core/error.hpp"

namespace effattn::detail {

/// A number no other object of the program has: a copy is another object and gets a new one,
/// a move keeps it (the object is the same, only its storage moved).
class InstanceId {
 public:
  InstanceId() : id_(next()) {}
  InstanceId(const InstanceId&) : id_(next()) {}
  InstanceId(InstanceId&& other) noexcept : id_(other.id_) {}
  InstanceId& operator=(const InstanceId&) { return *this; }  // keeps its own
  InstanceId& operator=(InstanceId&&) noexcept { return *this; }
  std::uint64_t value() const { return id_; }

 private:
  static std::uint64_t next() {
    static std::atomic<std::uint64_t> counter{0};
    return counter.fetch_add(1, std::memory_order_relaxed) + 1;  // 0 is no object
  }
  std::uint64_t id_;
};

/// One call at a time on an object: enter() marks it busy until the returned scope ends, and
/// throws an effattn::Error naming `who` if a call (from another thread) is already running.
/// Costs one atomic exchange per call. Copies start idle.
class ExclusiveUse {
 public:
  ExclusiveUse() = default;
  ExclusiveUse(const ExclusiveUse&) noexcept {}
  ExclusiveUse& operator=(const ExclusiveUse&) noexcept { return *this; }

  class [[nodiscard]] Scope {
   public:
    explicit Scope(std::atomic<bool>& busy) : busy_(busy) {}
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    ~Scope() { busy_.store(false, std::memory_order_release); }

   private:
    std::atomic<bool>& busy_;
  };

  Scope enter(const char* who) {
    require(!busy_.exchange(true, std::memory_order_acquire), who, "this",
            "already running a call (one object used from two threads at once)",
            "one call at a time on an object: give each thread its own layer or block");
    return Scope(busy_);
  }

 private:
  std::atomic<bool> busy_{false};
};

}  // namespace effattn::detail

#pragma once
// Activation memory: what layers hold between a training forward and its backward, counted
// process-wide so a test or benchmark can read the peak of a whole model.

#include <atomic>
#include <cstddef>

namespace effattn {

/// Bytes of activations every layer in the process holds for its backward (not
/// parameters, not scratch), and their peak since the last reset. A layer reports what
/// it keeps through a HeldActivations member; reading the meter around a training step
/// gives that step's activation memory as a deterministic count.
class ActivationMeter {
 public:
  std::size_t in_use() const { return in_use_.load(std::memory_order_relaxed); }
  std::size_t peak() const { return peak_.load(std::memory_order_relaxed); }
  void reset_peak() { peak_.store(in_use(), std::memory_order_relaxed); }

  void add(std::size_t bytes) {
    const std::size_t now = in_use_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    std::size_t seen = peak_.load(std::memory_order_relaxed);
    while (now > seen && !peak_.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
    }
  }
  void remove(std::size_t bytes) { in_use_.fetch_sub(bytes, std::memory_order_relaxed); }

 private:
  std::atomic<std::size_t> in_use_{0};
  std::atomic<std::size_t> peak_{0};
};

/// The process's meter. One per process by design: it is a memory figure, like a memory
/// profiler's, and counts every model (the sum is what the process holds); atomic, so models
/// in different threads may train at once. It never changes what a layer computes. For one
/// model's figure, read `model.activation_bytes()`, which each layer reports itself.
inline ActivationMeter& activation_meter() {
  static ActivationMeter meter;
  return meter;
}

/// What one layer holds: `set(bytes)` after saving or releasing. Copies hold (and count)
/// what the original holds, as a copied layer copies its matrices.
class HeldActivations {
 public:
  HeldActivations() = default;
  HeldActivations(const HeldActivations& other) { set(other.bytes_); }
  HeldActivations(HeldActivations&& other) noexcept : bytes_(other.bytes_) { other.bytes_ = 0; }
  HeldActivations& operator=(const HeldActivations& other) {
    set(other.bytes_);
    return *this;
  }
  HeldActivations& operator=(HeldActivations&& other) noexcept {
    if (this != &other) {
      set(0);
      bytes_ = other.bytes_;
      other.bytes_ = 0;
    }
    return *this;
  }
  ~HeldActivations() { set(0); }

  void set(std::size_t bytes) {
    if (bytes > bytes_)
      activation_meter().add(bytes - bytes_);
    else
      activation_meter().remove(bytes_ - bytes);
    bytes_ = bytes;
  }
  std::size_t bytes() const { return bytes_; }

 private:
  std::size_t bytes_ = 0;
};

}  // namespace effattn

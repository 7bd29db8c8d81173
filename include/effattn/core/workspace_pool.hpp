#pragma once
// WorkspacePool: one Workspace per thread of a parallel call, sized before the region.

#include <cstddef>
#include <vector>

#include "effattn/core/workspace.hpp"

namespace effattn {

/// One Workspace per thread. `peak_bytes` adds the threads' peaks: the scratch a call
/// can hold at once.
class WorkspacePool {
 public:
  explicit WorkspacePool(int threads = 1) { resize(threads); }

  void resize(int threads) {
    if (static_cast<int>(spaces_.size()) < threads)
      spaces_.resize(static_cast<std::size_t>(threads));
  }
  /// Gives every thread's workspace at least `bytes` in one block.
  void reserve_each(std::size_t bytes) {
    for (auto& w : spaces_)
      w.reserve(bytes);
  }
  Workspace& operator[](int thread) { return spaces_[static_cast<std::size_t>(thread)]; }
  int size() const { return static_cast<int>(spaces_.size()); }

  std::size_t peak_bytes() const {
    std::size_t total = 0;
    for (const auto& w : spaces_)
      total += w.peak_bytes();
    return total;
  }
  std::size_t growths() const {
    std::size_t total = 0;
    for (const auto& w : spaces_)
      total += w.growths();
    return total;
  }
  void reset_peak() {
    for (auto& w : spaces_)
      w.reset_peak();
  }

 private:
  std::vector<Workspace> spaces_;
};

}  // namespace effattn

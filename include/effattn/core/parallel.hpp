#pragma once
// The library's one parallel loop. With OpenMP it runs on a team of threads; without,
// the pragmas vanish and the same code runs serially. parallel_for needs no omp.h: its body
// is identical in every translation unit, only the pragma differs. The one exception is
// EigenSingleThreadScope below, which must talk to the OpenMP runtime; the effattn target
// carries OpenMP to every translation unit that uses it, so they all see the same body.

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>

#include "effattn/core/types.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace effattn {

/// Threads a parallel region would get here (1 without OpenMP or inside a parallel region).
inline int max_threads() {
  std::atomic<int> count{0};
#pragma omp parallel
  { count.fetch_add(1, std::memory_order_relaxed); }
  return std::max(1, count.load());
}

/// How parallel_for hands out tasks. `dynamic`: one at a time to whichever thread is free
/// (tasks of unequal cost balance). `fixed`: slot s runs tasks s, s + T, s + 2T, … in order
/// (T slots), so what each slot computes, and in which order, is the same on every call:
/// per-slot partial sums reduced in slot order are then bitwise reproducible.
enum class Schedule { dynamic, fixed };

/// Runs body(task, slot) for task = 0 … count−1 on at most `threads` threads; `slot` in
/// [0, min(threads, count)) is never used by two threads at once, for per-thread scratch.
/// The first exception thrown by a task is rethrown after every thread has stopped.
template <class Body>
void parallel_for(Index count, int threads, Body&& body, Schedule schedule = Schedule::dynamic) {
  if (count <= 0) return;
  threads = static_cast<int>(std::clamp<Index>(count, 1, std::max(threads, 1)));
  std::atomic<int> next_slot{0};
  std::atomic<Index> next_task{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(threads)
  {
    const auto run = [&](Index task, int slot) {
      try {
        body(task, slot);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed.store(true);
      }
    };
    if (schedule == Schedule::dynamic) {
      const int slot = next_slot.fetch_add(1, std::memory_order_relaxed);
      for (Index task = next_task.fetch_add(1); task < count && !failed.load();
           task = next_task.fetch_add(1))
        run(task, slot);
    } else {  // a team smaller than asked for runs the remaining slots one after another
      for (int slot = next_slot.fetch_add(1); slot < threads; slot = next_slot.fetch_add(1))
        for (Index task = slot; task < count && !failed.load(); task += threads)
          run(task, slot);
    }
  }
  if (error) std::rethrow_exception(error);
}

namespace detail {

/// A mutex that copies as a fresh mutex, so that objects guarding a gradient or a cache with one
/// stay copyable.
struct CopyableMutex {
  CopyableMutex() = default;
  CopyableMutex(const CopyableMutex&) {}
  CopyableMutex& operator=(const CopyableMutex&) { return *this; }
  std::mutex mutex;
};

/// While alive, Eigen's matrix products on this thread run serially.
/// Why: Eigen starts its own OpenMP team for a large-enough product whenever it is not
/// already inside a team of two or more threads (it reads omp_get_max_threads()). Inside a
/// kernel's tile loop that costs a heap allocation and a fork per product, and oversubscribes
/// when nesting is on. The per-thread OpenMP setting is restored on exit. (An explicit
/// Eigen::setNbThreads(n > 1) by the user overrides this; leave it unset.)
class EigenSingleThreadScope {
 public:
#ifdef _OPENMP
  EigenSingleThreadScope() : saved_(omp_get_max_threads()) {
    omp_set_num_threads(1);
  }
  ~EigenSingleThreadScope() {
    omp_set_num_threads(saved_);
  }
#else
  EigenSingleThreadScope() = default;
#endif
  EigenSingleThreadScope(const EigenSingleThreadScope&) = delete;
  EigenSingleThreadScope& operator=(const EigenSingleThreadScope&) = delete;

 private:
#ifdef _OPENMP
  int saved_;
#endif
};

}  // namespace detail
}  // namespace effattn

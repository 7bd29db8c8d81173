#pragma once
// The library's one parallel loop, and the ordering of the blocks of one head that its tasks
// merge. With OpenMP it runs on a team of threads; without, the pragmas vanish and the same
// code runs serially. max_threads and EigenSingleThreadScope ask the OpenMP runtime; the
// effattn target carries OpenMP to every translation unit that uses it, so they all see the
// same bodies.

#include <algorithm>
#include <atomic>
#include <cassert>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "effattn/core/types.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace effattn {

/// Threads a parallel region would get here (1 without OpenMP or where no more levels of
/// parallelism may open, e.g. inside a parallel region with nesting off). Asked of the runtime,
/// not found by starting a team: a call that decodes one token costs microseconds.
inline int max_threads() {
#ifdef _OPENMP
  if (omp_get_active_level() >= omp_get_max_active_levels()) return 1;
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
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
  if (threads == 1) {  // no team to start: the tasks in order, on this thread
    for (Index task = 0; task < count; ++task)
      body(task, 0);
    return;
  }
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

/// Steps of several chains run in a fixed order whichever threads run them: step s of chain c
/// runs after step s − 1 of c has run. This is how the blocks of one head merge their partial
/// results (a gradient summed over key blocks, a softmax merged over cache blocks) in block
/// order, so that the result has the same bits for every thread count, without a buffer per
/// block: each block merges from its thread's scratch as soon as its predecessor has merged.
/// Use it inside parallel_for with Schedule::dynamic and tasks numbered in step order within a
/// chain: a task is handed out only after every earlier task, so a step waits only for a step
/// that is running or done. Number them step-major (task = step · chains + chain): a step's
/// predecessor was then handed out a whole round of chains earlier, and is seldom still running. A
/// task that throws calls abandon(), and every wait then ends (the merge skipped; parallel_for
/// rethrows the error).
class OrderedSteps {
 public:
  OrderedSteps() = default;
  // Copies start empty: the turns belong to a call, not to the object that holds them.
  OrderedSteps(const OrderedSteps&) {}
  OrderedSteps& operator=(const OrderedSteps&) { return *this; }

  /// `chains` chains, each at step 0. Call before the parallel region (it may allocate).
  void reset(Index chains) {
    if (chains > capacity_) {
      turns_ = std::make_unique<std::atomic<Index>[]>(static_cast<std::size_t>(chains));
      capacity_ = chains;
    }
    for (Index c = 0; c < chains; ++c)
      turns_[static_cast<std::size_t>(c)].store(0, std::memory_order_relaxed);
    abandoned_.store(false);
  }

  /// Waits until step `step` of chain `chain` is due, runs merge(), and makes step + 1 due.
  template <class Merge>
  void run(Index chain, Index step, Merge&& merge) {
    auto& turn = turns_[static_cast<std::size_t>(chain)];
    while (turn.load(std::memory_order_acquire) != step) {
      if (abandoned_.load(std::memory_order_relaxed)) return;
      std::this_thread::yield();
    }
    assert(turn.load() == step);
    struct Pass {  // the next step is due even if merge() throws
      std::atomic<Index>& turn;
      ~Pass() { turn.fetch_add(1, std::memory_order_release); }
    } pass{turn};
    merge();
  }

  /// Waits until `count` steps of chain `chain` have run (a task that reads what they merged).
  void wait(Index chain, Index count) const {
    const auto& turn = turns_[static_cast<std::size_t>(chain)];
    while (turn.load(std::memory_order_acquire) < count &&
           !abandoned_.load(std::memory_order_relaxed))
      std::this_thread::yield();
  }

  /// Ends every wait: a task failed, and the steps after it will not run.
  void abandon() { abandoned_.store(true); }

 private:
  std::unique_ptr<std::atomic<Index>[]> turns_;
  Index capacity_ = 0;
  std::atomic<bool> abandoned_{false};
};

/// What a block task of a policy is handed to order itself within its (sequence, head): call it
/// with a function to run that function as the block's step, after the steps of the blocks
/// before it (a merge into what the blocks share); wait(n) waits until the first n blocks have
/// run their steps (a later stage that reads what they merged). Blocks are numbered in the order
/// of their steps. A block that merges nothing need not run a step when no block after it runs
/// one or waits past it.
class StepOrder {
 public:
  StepOrder(OrderedSteps& steps, Index chain, Index step)
      : steps_(&steps), chain_(chain), step_(step) {}
  template <class Merge>
  void operator()(Merge&& merge) const {
    steps_->run(chain_, step_, merge);
  }
  void wait(Index count) const { steps_->wait(chain_, count); }

 private:
  OrderedSteps* steps_;
  Index chain_, step_;
};

/// The StepOrder of blocks run one after another by one thread, in block order: each step runs
/// at once and every wait is already over.
struct InCallOrder {
  template <class Merge>
  void operator()(Merge&& merge) const {
    merge();
  }
  void wait(Index) const {}
};

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

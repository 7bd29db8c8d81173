#pragma once
// Communicator: the few MPI calls sequence-parallel attention makes, with errors as
// effattn::Error. Needs MPI (target effattn::mpi); the rest of the library never does.

// Only MPI's C interface is used: leave out Open MPI's and MPICH's deprecated C++ bindings.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"

namespace effattn::mpi {

namespace detail {
template <class S>
MPI_Datatype datatype() {
  if constexpr (std::is_same_v<S, float>)
    return MPI_FLOAT;
  else if constexpr (std::is_same_v<S, double>)
    return MPI_DOUBLE;
  else if constexpr (std::is_same_v<S, std::int32_t>)
    return MPI_INT32_T;
  else {
    static_assert(std::is_same_v<S, std::int64_t>,
                  "effattn::mpi: float, double, int32 or int64 only");
    return MPI_INT64_T;
  }
}
}  // namespace detail

/// A view of an MPI communicator (it does not own or free it): rank, size, and the calls the
/// sequence-parallel layers make. Every rank of the communicator must make the same calls in
/// the same order (as with MPI itself). A failed MPI call is an effattn::Error naming it; the
/// communicator is switched to MPI_ERRORS_RETURN so that MPI reports instead of aborting.
class Communicator {
 public:
  explicit Communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    effattn::detail::require(initialised != 0, "mpi::Communicator", "MPI", "not initialised",
                             "MPI_Init before any communicator");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }

  MPI_Comm comm() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  int next() const { return (rank_ + 1) % size_; }
  int previous() const { return (rank_ + size_ - 1) % size_; }

  /// Every rank's value, in rank order.
  std::vector<std::int64_t> all_gather(std::int64_t value) const {
    std::vector<std::int64_t> all(static_cast<std::size_t>(size_));
    check(MPI_Allgather(&value, 1, MPI_INT64_T, all.data(), 1, MPI_INT64_T, comm_),
          "MPI_Allgather");
    return all;
  }

  /// Every rank's `send` (counts[r] values from rank r; counts alike on every rank) into
  /// `recv`, in rank order.
  template <class S>
  void all_gather(const S* send, const std::vector<std::size_t>& counts, S* recv) const {
    std::vector<int> c, at;
    layout(counts, c, at);
    check(MPI_Allgatherv(send, c[std::size_t(rank_)], detail::datatype<S>(), recv, c.data(),
                         at.data(), detail::datatype<S>(), comm_),
          "MPI_Allgatherv");
  }

  /// Personalised all-to-all: send_counts[r] values of `send` (in rank order) go to rank r,
  /// and recv_counts[r] values from rank r arrive in `recv` (in rank order).
  template <class S>
  void all_to_all(const S* send, const std::vector<std::size_t>& send_counts, S* recv,
                  const std::vector<std::size_t>& recv_counts) const {
    std::vector<int> sc, sat, rc, rat;
    layout(send_counts, sc, sat);
    layout(recv_counts, rc, rat);
    check(MPI_Alltoallv(send, sc.data(), sat.data(), detail::datatype<S>(), recv, rc.data(),
                        rat.data(), detail::datatype<S>(), comm_),
          "MPI_Alltoallv");
  }

  /// In place: data[i] = Σ over ranks (or the maximum, with max = true).
  template <class S>
  void all_reduce(S* data, std::size_t count, bool max = false) const {
    check(MPI_Allreduce(MPI_IN_PLACE, data, count_of(count), detail::datatype<S>(),
                        max ? MPI_MAX : MPI_SUM, comm_),
          "MPI_Allreduce");
  }

  /// Exclusive scan of `data` (on every rank the same length) by recursive doubling:
  /// ⌈log₂ P⌉ exchanges of the whole buffer. `combine(into, from)` must be associative and
  /// commutative. Afterwards `data` holds the combination of the ranks before this one (after
  /// it, with `reverse`), and `received` is false on the first rank (last, with `reverse`),
  /// whose data is left as it was.
  struct ScanResult {
    bool received = false;
    std::size_t values_sent = 0;
  };
  template <class S, class Combine>
  ScanResult exclusive_scan(std::vector<S>& data, bool reverse, Combine&& combine) const {
    ScanResult result;
    const int me = reverse ? size_ - 1 - rank_ : rank_;
    std::vector<S> partial = data, incoming(data.size()), before;
    for (int mask = 1; mask < size_; mask <<= 1) {
      const int other = me ^ mask;
      if (other >= size_) continue;
      const int partner = reverse ? size_ - 1 - other : other;
      check(MPI_Sendrecv(partial.data(), count_of(partial.size()), detail::datatype<S>(), partner,
                         mask, incoming.data(), count_of(incoming.size()), detail::datatype<S>(),
                         partner, mask, comm_, MPI_STATUS_IGNORE),
            "MPI_Sendrecv");
      result.values_sent += partial.size();
      if (other < me) {
        if (result.received)
          combine(before.data(), incoming.data());
        else
          before = incoming;
        result.received = true;
      }
      combine(partial.data(), incoming.data());
    }
    if (result.received) data = std::move(before);
    return result;
  }

  /// Sends `count` values to `to` and receives `recv_count` from `from` without blocking;
  /// wait() on the result before touching either buffer.
  class Exchange {
   public:
    Exchange() = default;
    Exchange(const Exchange&) = delete;
    Exchange& operator=(const Exchange&) = delete;
    ~Exchange() {
      if (active_) MPI_Waitall(2, requests_, MPI_STATUSES_IGNORE);  // never leave one pending
    }
    void wait() {
      if (!active_) return;
      active_ = false;
      Communicator::check(MPI_Waitall(2, requests_, MPI_STATUSES_IGNORE), "MPI_Waitall");
    }

   private:
    friend class Communicator;
    MPI_Request requests_[2]{MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    bool active_ = false;
  };
  template <class S>
  void start_exchange(Exchange& e, const S* send, std::size_t count, int to, S* recv,
                      std::size_t recv_count, int from, int tag = 0) const {
    e.wait();
    check(MPI_Irecv(recv, count_of(recv_count), detail::datatype<S>(), from, tag, comm_,
                    &e.requests_[1]),
          "MPI_Irecv");
    const int sent =
        MPI_Isend(send, count_of(count), detail::datatype<S>(), to, tag, comm_, &e.requests_[0]);
    if (sent != MPI_SUCCESS) {
      MPI_Cancel(&e.requests_[1]);
      MPI_Request_free(&e.requests_[1]);
    }
    check(sent, "MPI_Isend");
    e.active_ = true;
  }

  /// Throws an Error naming `call` unless `code` is MPI_SUCCESS.
  static void check(int code, const char* call) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw Error("mpi::Communicator", call, std::string(text, std::size_t(length)), "MPI_SUCCESS");
  }

 private:
  // MPI's counts and displacements of one value block per rank.
  void layout(const std::vector<std::size_t>& counts, std::vector<int>& c,
              std::vector<int>& at) const {
    effattn::detail::require(counts.size() == std::size_t(size_), "mpi::Communicator", "counts",
                             counts.size(), effattn::detail::concat("one per rank (", size_, ")"));
    std::size_t total = 0;
    for (const std::size_t n : counts) {
      c.push_back(count_of(n));
      at.push_back(count_of(total));
      total += n;
    }
    count_of(total);
  }
  static int count_of(std::size_t count) {
    effattn::detail::require(count <= std::size_t(INT_MAX), "mpi::Communicator", "count", count,
                             "at most INT_MAX values in one message");
    return static_cast<int>(count);
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace effattn::mpi

#pragma once
// RowExchange: rows of every (sequence, head) problem sent from the ranks that hold them to the
// ranks that need them, and results returned the same way (mpi::ShardedLSH).

#include <cstddef>
#include <cstdint>
#include <vector>

#include "effattn/core/parallel.hpp"
#include "effattn/core/types.hpp"
#include "effattn/mpi/communicator.hpp"

namespace effattn::mpi::detail {

/// Which of this rank's rows each problem sends to every rank (`sent`, local rows grouped by
/// destination in rank order, `sent_count` per rank) and how many arrive from every rank
/// (`received_count`, learned by agree()). Messages hold rows of `width` values ordered by
/// rank, then problem, then the senders' order; the fetched rows of a call are numbered so.
class RowExchange {
 public:
  struct Lists {
    std::vector<std::int32_t> sent;
    std::vector<std::size_t> sent_count, received_count;
  };

  RowExchange(const Communicator& comm, std::size_t problems)
      : comm_(comm), lists_(problems, Lists{{}, std::vector<std::size_t>(ranks(comm), 0), {}}) {}

  Lists& operator[](std::size_t problem) { return lists_[problem]; }
  const Lists& operator[](std::size_t problem) const { return lists_[problem]; }
  std::size_t problems() const { return lists_.size(); }

  /// Once every problem's sent lists are set: one all-to-all of the counts. Returns the bytes
  /// this rank sent to other ranks.
  std::size_t agree() {
    const std::size_t P = ranks(comm_), Q = lists_.size();
    std::vector<std::int64_t> out(P * Q), in(P * Q);
    for (std::size_t r = 0; r < P; ++r)
      for (std::size_t q = 0; q < Q; ++q)
        out[r * Q + q] = std::int64_t(lists_[q].sent_count[r]);
    comm_.all_to_all(out.data(), std::vector<std::size_t>(P, Q), in.data(),
                     std::vector<std::size_t>(P, Q));
    for (std::size_t q = 0; q < Q; ++q) {
      lists_[q].received_count.assign(P, 0);
      for (std::size_t r = 0; r < P; ++r)
        lists_[q].received_count[r] = std::size_t(in[r * Q + q]);
    }
    return P > 1 ? sizeof(std::int64_t) * (P - 1) * Q : 0;
  }

  /// Rows that arrive, over all problems.
  Index received_rows() const {
    Index rows = 0;
    for (const Lists& l : lists_)
      for (const std::size_t c : l.received_count)
        rows += Index(c);
    return rows;
  }
  /// The fetched row where problem q's rows from rank `from` begin.
  Index first_row(std::size_t from, std::size_t q) const {
    Index row = 0;
    for (std::size_t r = 0; r <= from; ++r)
      for (std::size_t p = 0; p < lists_.size(); ++p) {
        if (r == from && p == q) return row;
        row += Index(lists_[p].received_count[r]);
      }
    return row;
  }

  /// Into `buffer`: rows of `width` values for every row this rank sends;
  /// fill(problem, local row, to) writes one. Parallel over the problems with `threads`.
  template <class T, class Fill>
  void pack(std::vector<T>& buffer, Index width, int threads, Fill&& fill) const {
    const std::size_t P = ranks(comm_), Q = lists_.size();
    std::vector<std::size_t> start(P * Q);
    std::size_t rows = 0;
    for (std::size_t r = 0; r < P; ++r)
      for (std::size_t q = 0; q < Q; ++q) {
        start[r * Q + q] = rows;
        rows += lists_[q].sent_count[r];
      }
    buffer.resize(rows * std::size_t(width));
    T* out = buffer.data();
    parallel_for(Index(Q), threads, [&](Index problem, int) {
      const Lists& l = lists_[std::size_t(problem)];
      std::size_t i = 0;
      for (std::size_t r = 0; r < P; ++r) {
        std::size_t row = start[r * Q + std::size_t(problem)];
        for (std::size_t c = 0; c < l.sent_count[r]; ++c, ++i, ++row)
          fill(problem, Index(l.sent[i]), out + row * std::size_t(width));
      }
    });
  }

  /// One all-to-all of `send`'s rows of `width` into `into`: the sent rows to the ranks that
  /// need them, or (`back`) the fetched rows' results to the ranks that sent them. Returns the
  /// bytes this rank sent to other ranks.
  template <class T>
  std::size_t exchange(const std::vector<T>& send, Index width, bool back,
                       std::vector<T>& into) const {
    const std::size_t P = ranks(comm_);
    std::vector<std::size_t> to(P, 0), from(P, 0);
    for (const Lists& l : lists_)
      for (std::size_t r = 0; r < P; ++r) {
        to[r] += (back ? l.received_count : l.sent_count)[r] * std::size_t(width);
        from[r] += (back ? l.sent_count : l.received_count)[r] * std::size_t(width);
      }
    std::size_t total = 0, bytes = 0;
    for (std::size_t r = 0; r < P; ++r) {
      total += from[r];
      if (int(r) != comm_.rank()) bytes += sizeof(T) * to[r];
    }
    into.resize(total);
    comm_.all_to_all(send.data(), to, into.data(), from);
    return bytes;
  }

  /// Calls f(local row, values) for every row of problem q that came back (exchange with
  /// `back` of rows of `width`), in the order sent.
  template <class T, class F>
  void for_each_returned(std::size_t q, Index width, const T* back, F&& f) const {
    std::size_t row = 0, i = 0;
    const Lists& l = lists_[q];
    for (std::size_t r = 0; r < l.sent_count.size(); ++r)
      for (std::size_t p = 0; p < lists_.size(); ++p) {
        const std::size_t count = lists_[p].sent_count[r];
        if (p == q)
          for (std::size_t c = 0; c < count; ++c, ++i)
            f(Index(l.sent[i]), back + (row + c) * std::size_t(width));
        row += count;
      }
  }

 private:
  static std::size_t ranks(const Communicator& comm) { return std::size_t(comm.size()); }

  Communicator comm_;
  std::vector<Lists> lists_;
};

}  // namespace effattn::mpi::detail

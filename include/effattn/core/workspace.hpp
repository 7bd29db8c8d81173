#pragma once
// Scratch memory: planned up front, handed out by a bump pointer, peak reported.

#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>
#include <vector>

#include "effattn/core/types.hpp"

namespace effattn {

/// Scratch memory of one thread. A caller sizes it once (`reserve`) from the kernel's
/// own `scratch_bytes` plan; kernels then `take` typed slices in their loops and give them
/// back by scope (`Frame`), so the hot loops never call the allocator. If a plan was too
/// small the workspace still works, by adding a block, and counts it in `growths()`:
/// the tests assert that count stays 0.
class Workspace {
 public:
  static constexpr std::size_t alignment = 64;

  Workspace() = default;
  Workspace(Workspace&&) noexcept = default;
  Workspace& operator=(Workspace&&) noexcept = default;

  /// Rounds a byte count up to the alignment every slice gets.
  static constexpr std::size_t aligned(std::size_t bytes) {
    return (bytes + alignment - 1) / alignment * alignment;
  }
  /// Bytes a slice of `count` scalars occupies.
  template <class S>
  static constexpr std::size_t bytes_for(Index count) {
    return aligned(static_cast<std::size_t>(count) * sizeof(S));
  }

  /// Makes sure `bytes` are available in one block. Call when nothing is taken.
  void reserve(std::size_t bytes) {
    bytes = aligned(bytes);
    if (!blocks_.empty() && blocks_.front().size >= bytes) return;
    const std::size_t total = std::max(bytes, total_capacity());
    blocks_.clear();
    if (total > 0) blocks_.push_back(Block::make(total));
    block_ = 0;
    offset_ = 0;
  }

  /// A slice of `count` scalars, 64-byte aligned, uninitialised.
  template <class S>
  S* take(Index count) {
    const std::size_t bytes = bytes_for<S>(count);
    while (block_ < blocks_.size() && offset_ + bytes > blocks_[block_].size) {
      ++block_;
      offset_ = 0;
    }
    if (block_ == blocks_.size()) {
      blocks_.push_back(Block::make(std::max(bytes, total_capacity())));
      ++growths_;
      offset_ = 0;
    }
    std::byte* p = blocks_[block_].data.get() + offset_;
    offset_ += bytes;
    in_use_ += bytes;
    peak_ = std::max(peak_, in_use_);
    return reinterpret_cast<S*>(p);
  }

  /// A row-major rows×cols matrix over a fresh slice.
  template <class S>
  Eigen::Map<Matrix<S>, Eigen::Aligned64> matrix(Index rows, Index cols) {
    return Eigen::Map<Matrix<S>, Eigen::Aligned64>(take<S>(rows * cols), rows, cols);
  }

  /// Gives back, at scope exit, everything taken since the frame was opened.
  class Frame {
   public:
    explicit Frame(Workspace& ws)
        : ws_(ws), block_(ws.block_), offset_(ws.offset_), in_use_(ws.in_use_) {}
    ~Frame() {
      ws_.block_ = block_;
      ws_.offset_ = offset_;
      ws_.in_use_ = in_use_;
    }
    Frame(const Frame&) = delete;
    Frame& operator=(const Frame&) = delete;

   private:
    Workspace& ws_;
    std::size_t block_, offset_, in_use_;
  };

  std::size_t in_use() const { return in_use_; }
  std::size_t peak_bytes() const { return peak_; }
  std::size_t growths() const { return growths_; }
  std::size_t total_capacity() const {
    std::size_t total = 0;
    for (const auto& b : blocks_)
      total += b.size;
    return total;
  }
  void reset_peak() { peak_ = in_use_; }

 private:
  struct Deleter {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{alignment}); }
  };
  struct Block {
    std::unique_ptr<std::byte[], Deleter> data;
    std::size_t size = 0;
    static Block make(std::size_t size) {
      return {std::unique_ptr<std::byte[], Deleter>(
                  static_cast<std::byte*>(::operator new[](size, std::align_val_t{alignment}))),
              size};
    }
  };

  std::vector<Block> blocks_;
  std::size_t block_ = 0;
  std::size_t offset_ = 0;
  std::size_t in_use_ = 0;
  std::size_t peak_ = 0;
  std::size_t growths_ = 0;
};

}  // namespace effattn

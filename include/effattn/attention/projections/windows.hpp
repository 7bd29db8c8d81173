#pragma once
// Windows: the geometry the pooling and convolution projections share.

#include <algorithm>
#include <string_view>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"

namespace effattn {

namespace detail {

/// The geometry the windowed projections share (window length = stride = kernel): n tokens
/// give n/kernel rows; row i reads tokens i·kernel … i·kernel + kernel − 1.
class Windows {
 public:
  struct Config {
    Index kernel = 16;  ///< window (or filter) length, and stride
  };

  Windows(const Config& config, std::string_view component) : config_(config) {
    require(config_.kernel > 0, component, "kernel", config_.kernel, "at least 1 token");
  }

  const Config& config() const { return config_; }
  Index rows(Index n) const { return n / config_.kernel; }
  Index visible_rows(Index, Index valid) const {
    return (valid + config_.kernel - 1) / config_.kernel;
  }
  void check(std::string_view component, Index n) const {
    require(n % config_.kernel == 0, component, "n", n,
            concat("a multiple of the projection's kernel (", config_.kernel,
                   "): pooling and convolution take whole windows"));
  }

 protected:
  Index kernel() const { return config_.kernel; }
  /// Tokens of window i before `valid` (the rest are padding).
  Index count(Index i, Index valid) const {
    return std::clamp<Index>(valid - i * config_.kernel, 0, config_.kernel);
  }

 private:
  Config config_;
};

}  // namespace detail

}  // namespace effattn

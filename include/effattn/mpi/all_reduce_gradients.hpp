#pragma once
// all_reduce_gradients: the sum over ranks of every parameter gradient, after a
// sequence-parallel backward.

#include <algorithm>
#include <cstddef>
#include <string_view>
#include <type_traits>
#include <vector>

#include "effattn/mpi/communicator.hpp"

namespace effattn::mpi {

/// Replaces every parameter gradient of the models (anything with visit_parameters) by its
/// sum over the ranks of `comm`, in one all-reduce. After a sequence-parallel backward each
/// rank holds its rows' share of each gradient; the sum is the whole sequences' gradient, and
/// every rank then takes the same optimiser step. Collective: every rank calls it with the
/// same models.
template <class... Models>
void all_reduce_gradients(const Communicator& comm, Models&... models) {
  using S = std::common_type_t<typename Models::Scalar...>;
  std::vector<S> all;
  auto each = [&](auto&& f) {
    (models.visit_parameters([&](std::string_view, auto&, auto& gradient) { f(gradient); }), ...);
  };
  each([&](auto& g) { all.insert(all.end(), g.data(), g.data() + g.size()); });
  comm.all_reduce(all.data(), all.size());
  std::size_t at = 0;
  each([&](auto& g) {
    std::copy_n(all.data() + at, g.size(), g.data());
    at += std::size_t(g.size());
  });
}

}  // namespace effattn::mpi

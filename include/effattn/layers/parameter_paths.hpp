#pragma once
// Parameter paths: the stable names under which visit_parameters passes a model's parameters,
// and parameter_paths(), which lists them.
//
// A layer's visit_parameters(f) calls f(path, value, gradient) for each of its parameters, in
// a fixed order. The path names the parameter relative to the layer visited, as dot-separated
// segments that follow the model's structure; checkpoints and optimiser state are keyed by it,
// so these rules are part of the library's interface and change only with its major version:
//
//   leaf layers name their own tensors
//     MultiHeadAttention  w_q b_q w_k b_k w_v b_v w_o b_o (no w_k, b_k when the policy shares
//                         QK; no b_* without bias), then its policy's: LowRank's projections
//                         E and F (shared by the heads), or E.<h> and F.<h> per head <h>
//     FeedForward         w_1 b_1 w_2 b_2
//     LayerNorm           gamma beta
//   Residual, Chunked     add no segment: their layer's paths, unchanged
//   PreNorm               norm.<…> for its norm, and <group>.<…> for its layer, where the group
//                         says what the layer is: attention, feed_forward (a wrapper passes its
//                         layer's on; "layer" for a type that names none)
//   Reversible            f.<…> and g.<…> (the two residual functions of the RevNet block)
//   Repeat, Sequential    block.<i>.<…> for block i
//
// So Repeat<Residual<PreNorm<MultiHeadAttention<…>>>> has block.0.norm.gamma, …,
// block.0.attention.w_q, …; in docs/guide.md's Reformer encoder (Sequential<Duplicate,
// Repeat<Reversible<PreNorm<attention>, PreNorm<Chunked<FeedForward>>>>, MergeHalves>) the
// query weight of the fourth block is block.1.block.3.f.attention.w_q. The path passed to f is
// valid during the call only: copy it (std::string) to keep it.
//
// Checkpoints also keep the random state of Favor and LSH policies under their block's path
// (visit_random_state, not visit_parameters: it is not trained): <path>.features or
// <path>.features.<h> (Favor), <path>.rotation.<h>.<r> and the metadata <path>.seed (LSH).

#include <string>
#include <string_view>
#include <vector>

#include "effattn/layers/layer.hpp"

namespace effattn {

/// Every parameter path of `layer` (any Layer, or anything else with visit_parameters, e.g.
/// an Embedding), in visiting order.
template <class L>
requires Layer<L> || requires(L& l) {
  l.visit_parameters(detail::ParameterSink<typename L::Scalar>{});
}
std::vector<std::string> parameter_paths(L& layer) {
  std::vector<std::string> paths;
  layer.visit_parameters([&](std::string_view path, auto&, auto&) { paths.emplace_back(path); });
  return paths;
}

}  // namespace effattn

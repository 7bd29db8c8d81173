#pragma once
// layer_workspace(): the scratch every layer takes its temporaries from, one per thread.

#include "effattn/core/workspace.hpp"

namespace effattn {

/// Scratch for layer-level temporaries (a block's projections when it is not training, a
/// chunk's hidden activation, a reversible block's recomputed halves): one per calling
/// thread, shared by every layer and every model that thread runs. Layers take from it under
/// a Frame, so its peak is the most one call needed at once, whatever the depth of the model.
///
/// Why it is global (per thread) rather than owned by a model: it holds nothing between
/// calls. Every layer gives back what it took before it returns (a Frame, also when an
/// exception unwinds), and what a model keeps for backward lives in the model's own members,
/// never here. So models interleaved in one thread cannot see each other's data, and sharing
/// one workspace costs the largest single call instead of the sum over models (a
/// model-owned workspace would keep each model's peak alive while the others run). Per
/// thread, so that models called from different threads at once never share one. Tested in
/// tests/layers/test_shared_state.cpp. Its capacity stays at the largest call the thread has
/// made (`layer_workspace().total_capacity()`); assign `Workspace{}` to it between calls to
/// give the memory back. Attention kernels take their per-thread scratch from the block's own
/// WorkspacePool instead, sized before each parallel region.
inline Workspace& layer_workspace() {
  thread_local Workspace ws;
  return ws;
}

}  // namespace effattn

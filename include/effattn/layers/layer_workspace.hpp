#pragma once
// layer_workspace(): the scratch every layer takes its temporaries from, one per thread.

#include "effattn/core/workspace.hpp"

namespace effattn {

/// Scratch for layer-level temporaries (a block's projections when it is not training, a
/// chunk's hidden activation, a reversible block's recomputed halves): one per calling
/// thread, shared by every layer that thread runs. Layers take from it under a Frame, so
/// its peak is the most one call needed at once, whatever the depth of the model.
inline Workspace& layer_workspace() {
  thread_local Workspace ws;
  return ws;
}

}  // namespace effattn

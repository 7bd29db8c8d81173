#pragma once
// effattn: efficient attention kernels on Eigen. Include this one header.

#include "effattn/core/concepts.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/head.hpp"
#include "effattn/core/parallel.hpp"
#include "effattn/core/product.hpp"
#include "effattn/core/rng.hpp"
#include "effattn/core/softmax.hpp"
#include "effattn/core/types.hpp"
#include "effattn/core/workspace.hpp"

#include "effattn/attention/favor.hpp"
#include "effattn/attention/feature_maps.hpp"
#include "effattn/attention/full_attention.hpp"
#include "effattn/attention/low_rank.hpp"
#include "effattn/attention/lsh.hpp"
#include "effattn/attention/random_features.hpp"
#include "effattn/attention/sequence_projections.hpp"

#include "effattn/layers/attention_core.hpp"
#include "effattn/layers/multi_head_attention.hpp"

// Parameter paths: the names visit_parameters passes follow the model's structure, are unique,
// and are the documented ones (layers/parameter_paths.hpp), which checkpoints will be keyed by.
#include <catch2/catch.hpp>

#include <set>
#include <string>
#include <vector>

#include "effattn/effattn.hpp"

using namespace effattn;

namespace {
using Attn = MultiHeadAttention<FullAttention<float>>;
using FF = FeedForward<float>;

std::vector<std::string> prefixed(const std::string& prefix, std::vector<std::string> names) {
  for (auto& n : names)
    n = prefix + n;
  return names;
}
std::vector<std::string> joined(std::vector<std::vector<std::string>> parts) {
  std::vector<std::string> all;
  for (auto& p : parts)
    all.insert(all.end(), p.begin(), p.end());
  return all;
}
const std::vector<std::string> attention_names = {"w_q", "w_k", "w_v", "w_o",
                                                  "b_q", "b_k", "b_v", "b_o"};
const std::vector<std::string> feed_forward_names = {"w_1", "w_2", "b_1", "b_2"};
const std::vector<std::string> norm_names = {"gamma", "beta"};

template <class L>
void check_unique(L& layer) {
  const auto paths = parameter_paths(layer);
  CHECK(std::set<std::string>(paths.begin(), paths.end()).size() == paths.size());
}
}  // namespace

TEST_CASE("Leaf layers name their own tensors; Residual and Chunked add no segment",
          "[layers][parameters]") {
  Attn attn({.d_model = 8, .heads = 2});
  CHECK(parameter_paths(attn) == attention_names);
  FF ff({.d_model = 8});
  CHECK(parameter_paths(ff) == feed_forward_names);
  LayerNorm<float> norm({.d_model = 8});
  CHECK(parameter_paths(norm) == norm_names);
  Residual<Chunked<FF>> residual({.layer = {.layer = {.d_model = 8}, .chunk = 4}});
  CHECK(parameter_paths(residual) == feed_forward_names);
  MultiHeadAttention<LSHAttention<float>> lsh({.d_model = 8, .heads = 2, .bias = false});
  CHECK(parameter_paths(lsh) == std::vector<std::string>{"w_q", "w_v", "w_o"});  // shared QK
}

TEST_CASE("PreNorm files its norm and its layer by what they are; stacks number their blocks",
          "[layers][parameters]") {
  using AttnBlock = Residual<PreNorm<Attn>>;
  using FFBlock = Residual<PreNorm<Chunked<FF>>>;
  using Block = Sequential<AttnBlock, FFBlock>;
  // A Sequential inside a Repeat's config: its blocks' configs, in order.
  Repeat<Block> model({.block = {{.layer = {.layer = {.d_model = 8, .heads = 2}}},
                                 {.layer = {.layer = {.layer = {.d_model = 8}}}}},
                       .depth = 2});
  std::vector<std::vector<std::string>> expected;
  for (const std::string i : {"0", "1"}) {
    const std::string a = "block." + i + ".block.0.", f = "block." + i + ".block.1.";
    expected.push_back(prefixed(a + "norm.", norm_names));
    expected.push_back(prefixed(a + "attention.", attention_names));
    expected.push_back(prefixed(f + "norm.", norm_names));
    expected.push_back(prefixed(f + "feed_forward.", feed_forward_names));
  }
  CHECK(parameter_paths(model) == joined(expected));
  check_unique(model);
  // The same stack from the blocks' configs and the depth, without the config's names.
  Repeat<Block> same({{.layer = {.layer = {.d_model = 8, .heads = 2}}},
                      {.layer = {.layer = {.layer = {.d_model = 8}}}}},
                     2);
  CHECK(parameter_paths(same) == joined(expected));
  CHECK(same.depth() == 2);
}

TEST_CASE("The guide's Reformer encoder: reversible halves are f and g", "[layers][parameters]") {
  using Lsh = MultiHeadAttention<LSHAttention<float>, Causal>;
  using RevBlock = Reversible<PreNorm<Lsh>, PreNorm<Chunked<FF>>>;
  using Encoder = Sequential<Duplicate<float>, Repeat<RevBlock>, MergeHalves<float>>;
  Encoder encoder({.d_model = 16},
                  {.block = {.f = {.layer = {.d_model = 16, .heads = 2}},
                             .g = {.layer = {.layer = {.d_model = 16}}}},
                   .depth = 4},
                  {.d_model = 16});
  const auto paths = parameter_paths(encoder);
  const std::vector<std::string> block3(paths.end() - 14, paths.end());
  CHECK(block3 == std::vector<std::string>{
                      "block.1.block.3.f.norm.gamma", "block.1.block.3.f.norm.beta",
                      "block.1.block.3.f.attention.w_q", "block.1.block.3.f.attention.w_v",
                      "block.1.block.3.f.attention.w_o", "block.1.block.3.f.attention.b_q",
                      "block.1.block.3.f.attention.b_v", "block.1.block.3.f.attention.b_o",
                      "block.1.block.3.g.norm.gamma", "block.1.block.3.g.norm.beta",
                      "block.1.block.3.g.feed_forward.w_1", "block.1.block.3.g.feed_forward.w_2",
                      "block.1.block.3.g.feed_forward.b_1", "block.1.block.3.g.feed_forward.b_2"});
  CHECK(paths.size() == 4 * 14);  // 4 blocks of 2 + 6 (f) and 2 + 4 (g) tensors
  check_unique(encoder);
  // Its LSH rotations (random state, which checkpoints keep) are under the attention's path.
  std::vector<std::string> random;
  encoder.visit_random_state([&](std::string_view path, auto& policy) {
    CHECK(policy.random_state().seed.has_value());
    random.emplace_back(path);
  });
  CHECK(random ==
        std::vector<std::string>{"block.1.block.0.f.attention", "block.1.block.1.f.attention",
                                 "block.1.block.2.f.attention", "block.1.block.3.f.attention"});
}

TEST_CASE("LowRank's projections: E and F when shared, E.<h> and F.<h> per head",
          "[layers][parameters]") {
  MultiHeadAttention<LowRank<float>> shared(
      {.d_model = 8, .heads = 2, .bias = false, .policy = {.projection = {.k = 4, .n_max = 16}}});
  CHECK(parameter_paths(shared) == std::vector<std::string>{"w_q", "w_k", "w_v", "w_o", "E", "F"});
  MultiHeadAttention<LowRank<float>> per_head(
      {.d_model = 8,
       .heads = 2,
       .bias = false,
       .policy = {.projection = {.k = 4, .n_max = 16}, .sharing = ProjectionSharing::none}});
  CHECK(parameter_paths(per_head) ==
        std::vector<std::string>{"w_q", "w_k", "w_v", "w_o", "E.0", "F.0", "E.1", "F.1"});
}

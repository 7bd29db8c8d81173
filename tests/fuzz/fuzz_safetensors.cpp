// libFuzzer target for the checkpoint loaders: any bytes as a safetensors file given to
// safetensors::load (a small model with a vector and a matrix, in float and double; strict and
// not) and to safetensors::load_optimizer (Adam and Sgd). The only outcome allowed besides success
// is an effattn::Error; anything else (a crash, a sanitizer report, another exception, a hang, a
// model changed by a failed load) stops the fuzzer.
//
// Built with clang (-fsanitize=fuzzer,address,undefined) when EFFATTN_BUILD_FUZZ is on. With
// EFFATTN_FUZZ_SEEDS defined, the same file builds a program that writes the seed corpus (the
// files save and save_optimizer write) into the folder given as its argument.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include "effattn/effattn.hpp"
#include "effattn/training/safetensors.hpp"

namespace {
namespace fs = std::filesystem;
using namespace effattn;

template <class S>
struct Models {
  Linear<S> linear{{.d_in = 3, .d_out = 4, .seed = 1}};
  LayerNorm<S> norm{{.d_model = 4}};
};

template <class M>
std::vector<std::vector<double>> values(M& model) {
  std::vector<std::vector<double>> out;
  model.visit_parameters(
      [&](std::string_view, auto& w, auto&) { out.emplace_back(w.data(), w.data() + w.size()); });
  return out;
}

// Trains one step so the optimisers have state (steps, moments) to save.
template <class S, class Opt>
void step(Models<S>& m, Opt& opt) {
  auto fill = [](std::string_view, auto&, auto& g) { g.setConstant(S(0.25)); };
  m.linear.visit_parameters(fill);
  m.norm.visit_parameters(fill);
  opt.step(m.linear, m.norm);
}

template <class Load>
void expect_error_or_success(Load&& load) {
  try {
    load();
  } catch (const Error&) {
  }
}

template <class S>
void load_all(const fs::path& file) {
  Models<S> m;
  const auto before = values(m.linear);
  bool loaded = true;
  try {
    safetensors::load(file, m.linear, m.norm);
  } catch (const Error&) {
    loaded = false;
  }
  if (!loaded && values(m.linear) != before) std::abort();  // a failed load changed the model
  // Not strict: an Error that changes nothing, or a report that accounts for every parameter.
  Models<S> part;
  const auto part_before = values(part.linear);
  std::size_t parameters = 0;
  const auto count = [&](std::string_view, auto&, auto&) { ++parameters; };
  part.linear.visit_parameters(count);
  part.norm.visit_parameters(count);
  try {
    const auto r = safetensors::load(file, {.strict = false}, part.linear, part.norm);
    if (r.loaded.size() + r.missing.size() + r.mismatched.size() != parameters) std::abort();
  } catch (const Error&) {
    if (values(part.linear) != part_before) std::abort();
  }
  Adam<S> adam({.lr = 1e-3});
  expect_error_or_success([&] { safetensors::load_optimizer(file, adam); });
  // A loaded state steps the model or is refused (another model's shapes) with an Error.
  if (adam.state_bytes() > 0) expect_error_or_success([&] { step(m, adam); });
  Sgd<S> sgd({.lr = 1e-3, .momentum = 0.9});
  expect_error_or_success([&] { safetensors::load_optimizer(file, sgd); });
}

}  // namespace

#ifndef EFFATTN_FUZZ_SEEDS
namespace {
// Where each input is written for the loaders (memory-backed when /dev/shm exists).
fs::path input_file() {
  const fs::path dir = fs::exists("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
  return dir / ("effattn_fuzz_" + std::to_string(::getpid()) + ".safetensors");
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const fs::path file = input_file();
  {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), std::streamsize(size));
  }
  load_all<float>(file);
  load_all<double>(file);
  return 0;
}
#else
int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus folder>\n", argv[0]);
    return 2;
  }
  const fs::path dir = argv[1];
  fs::create_directories(dir);
  Models<float> f;
  Models<double> d;
  safetensors::save(dir / "model_f32.safetensors", f.linear, f.norm);
  safetensors::save(dir / "model_f64.safetensors", d.linear, d.norm);
  safetensors::save(dir / "linear_only.safetensors", f.linear);
  Adam<float> adam({.lr = 1e-3});
  step(f, adam);
  safetensors::save_optimizer(dir / "adam_f32.safetensors", adam);
  Sgd<double> sgd({.lr = 1e-3, .momentum = 0.9});
  step(d, sgd);
  safetensors::save_optimizer(dir / "sgd_f64.safetensors", sgd);
  return 0;
}
#endif

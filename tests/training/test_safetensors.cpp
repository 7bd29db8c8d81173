// Checkpoints in the safetensors format: round trips, the bytes on disk, a file written by an
// independent writer, and failed loads that leave the model as it was.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "effattn/effattn.hpp"
#include "effattn/training/safetensors.hpp"
#include "layer_testing.hpp"

using namespace effattn;
using namespace layer_testing;
namespace fs = std::filesystem;

namespace {
using Block = Residual<PreNorm<MultiHeadAttention<FullAttention<float>>>>;
using Model = Repeat<Block>;

Model::Config model_config(std::uint64_t seed) {
  Model::Config c;
  c.depth = 2;
  c.block.layer.layer.d_model = 8;
  c.block.layer.layer.heads = 2;
  c.block.layer.layer.seed = seed;
  return c;
}

fs::path temp_file(const std::string& name) {
  return fs::temp_directory_path() / ("effattn_test_" + name + ".safetensors");
}

std::string bytes_of(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

template <class... Ms>
std::vector<MatD> all_parameters(Ms&... ms) {
  std::vector<MatD> out;
  auto add = [&](std::string_view, auto& w, auto&) { out.push_back(w.template cast<double>()); };
  (ms.visit_parameters(add), ...);
  return out;
}
}  // namespace

TEST_CASE("safetensors: a model saved and loaded has the same parameters and outputs",
          "[training]") {
  Model a(model_config(1));
  Embedding<float> emb_a({.vocab = 11, .d_model = 8, .seed = 2});
  randomise(a, 3);
  const fs::path file = temp_file("round_trip");
  safetensors::save(file, a, emb_a);

  Model b(model_config(9));
  Embedding<float> emb_b({.vocab = 11, .d_model = 8, .seed = 10});
  CHECK(all_parameters(a, emb_a) != all_parameters(b, emb_b));
  safetensors::load(file, b, emb_b);
  CHECK(all_parameters(a, emb_a) == all_parameters(b, emb_b));

  const SequenceShape shape{1, 5, {}};
  const Matrix<float> x = random<float>(5, 8, 4);
  Matrix<float> ya(5, 8), yb(5, 8);
  a.forward(x, ya, shape);
  b.forward(x, yb, shape);
  CHECK(ya == yb);
  fs::remove(file);
}

TEST_CASE("safetensors: the file holds a length, a JSON header and the raw tensors", "[training]") {
  Linear<double> head({.d_in = 3, .d_out = 5, .seed = 1});
  randomise(head, 2);
  const fs::path file = temp_file("layout");
  safetensors::save(file, head);
  const std::string bytes = bytes_of(file);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  REQUIRE(8 + n <= bytes.size());
  CHECK((8 + n) % 8 == 0);  // data 8-byte aligned
  const auto header = nlohmann::json::parse(bytes.substr(8, n));
  CHECK(header["__metadata__"]["format"] == "effattn");
  const auto params = parameters(head);
  std::uint64_t data_bytes = 0;
  for (const auto& [name, value] : params) {
    CAPTURE(name);
    const auto& entry = header.at(name);
    CHECK(entry["dtype"] == "F64");
    CHECK(entry["shape"] == nlohmann::json({value.rows(), value.cols()}));
    const std::uint64_t begin = entry["data_offsets"][0], end = entry["data_offsets"][1];
    REQUIRE(end - begin == sizeof(double) * std::uint64_t(value.size()));
    Matrix<double> stored(value.rows(), value.cols());  // row-major, as written
    std::memcpy(stored.data(), bytes.data() + 8 + n + begin, end - begin);
    CHECK(stored == value);  // little-endian, rows one after another
    data_bytes += end - begin;
  }
  CHECK(bytes.size() == 8 + n + data_bytes);  // nothing else in the file
  fs::remove(file);
}

TEST_CASE("safetensors: a failed load is an Error naming the tensor and changes nothing",
          "[training]") {
  Linear<float> saved({.d_in = 3, .d_out = 4, .seed = 1});
  const fs::path file = temp_file("errors");
  safetensors::save(file, saved);
  Linear<float> model({.d_in = 3, .d_out = 4, .seed = 5});
  const auto before = all_parameters(model);
  auto argument_of_load = [&](auto& m, const fs::path& f) {
    try {
      safetensors::load(f, m);
    } catch (const Error& e) {
      CHECK(e.component() == "safetensors::load");
      return e.argument();
    }
    return std::string("none");
  };

  SECTION("a missing tensor") {
    Linear<float> no_bias({.d_in = 3, .d_out = 4, .bias = false});
    safetensors::save(file, no_bias);
    CHECK(argument_of_load(model, file) == "tensor 'b'");
  }
  SECTION("a tensor the model does not have") {
    Linear<float> no_bias({.d_in = 3, .d_out = 4, .bias = false});
    const auto no_bias_before = all_parameters(no_bias);
    CHECK(argument_of_load(no_bias, file) == "tensor 'b'");
    CHECK(all_parameters(no_bias) == no_bias_before);
  }
  SECTION("a wrong shape") {
    Linear<float> wider({.d_in = 3, .d_out = 6});
    const auto wider_before = all_parameters(wider);
    CHECK(argument_of_load(wider, file) == "tensor 'w'");
    CHECK(all_parameters(wider) == wider_before);
  }
  SECTION("a wrong dtype") {
    Linear<double> twin({.d_in = 3, .d_out = 4});
    CHECK(argument_of_load(twin, file) == "tensor 'w'");
  }
  SECTION("a truncated body") {
    const std::string bytes = bytes_of(file);
    std::ofstream(file, std::ios::binary | std::ios::trunc)
        .write(bytes.data(), std::streamsize(bytes.size() - 4));
    CHECK(argument_of_load(model, file).starts_with("tensor '"));
  }
  SECTION("not a safetensors file") {
    std::ofstream(file, std::ios::binary | std::ios::trunc) << "hello";
    CHECK(argument_of_load(model, file) == "path");
    std::ofstream(file, std::ios::binary | std::ios::trunc)
        << std::string("\x05\0\0\0\0\0\0\0{oops", 13);
    CHECK(argument_of_load(model, file) == "header");
  }
  SECTION("no file") {
    CHECK(argument_of_load(model, temp_file("does_not_exist")) == "path");
  }
  CHECK(all_parameters(model) == before);

  // A save that cannot be written leaves nothing behind and is an Error.
  CHECK_THROWS_AS(safetensors::save(fs::path("/nonexistent-dir/x.safetensors"), saved), Error);
  fs::remove(file);
}

TEST_CASE(
    "safetensors: training resumed from a model and optimiser checkpoint continues "
    "exactly",
    "[training]") {
  auto train = [](Model& model, auto& opt, int from, int to) {
    const SequenceShape shape{1, 6, {}};
    Matrix<float> y(6, 8), dx(6, 8);
    model.set_training(true);
    for (int step = from; step < to; ++step) {
      const Matrix<float> x = random<float>(6, 8, 100 + std::uint64_t(step));
      model.zero_grad();
      model.forward(x, y, shape);
      model.backward(x, y, dx, shape);  // loss = ½‖y‖²
      opt.step(model);
    }
  };
  const fs::path weights = temp_file("resume_weights"), state = temp_file("resume_state");
  auto check_resume = [&](auto make_optimizer) {
    Model a(model_config(1));
    auto opt_a = make_optimizer();
    train(a, opt_a, 0, 3);
    safetensors::save(weights, a);
    safetensors::save_optimizer(state, opt_a);
    train(a, opt_a, 3, 5);

    Model b(model_config(7));
    auto opt_b = make_optimizer();
    safetensors::load(weights, b);
    safetensors::load_optimizer(state, opt_b);
    CHECK(opt_b.steps("block.0.attention.w_q") == 3);
    CHECK(opt_b.state_bytes() == opt_a.state_bytes());
    train(b, opt_b, 3, 5);
    CHECK(all_parameters(a) == all_parameters(b));
  };
  SECTION("AdamW") {
    check_resume([] { return AdamW<float>({.lr = 1e-2}); });
  }
  SECTION("Sgd with momentum") {
    check_resume([] { return Sgd<float>({.lr = 1e-2, .momentum = 0.9}); });
  }
  SECTION("a state file that does not fit is an Error and changes nothing") {
    Model a(model_config(1));
    Adam<float> adam({.lr = 1e-2});
    train(a, adam, 0, 2);
    safetensors::save_optimizer(state, adam);
    Sgd<float> sgd({.lr = 1e-2, .momentum = 0.9});
    train(a, sgd, 0, 1);
    const auto bytes = sgd.state_bytes();
    try {
      safetensors::load_optimizer(state, sgd);  // Adam's moments, no momentum buffers
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(e.component() == "safetensors::load_optimizer");
      CHECK(e.argument().find(".momentum'") != std::string::npos);
    }
    CHECK(sgd.state_bytes() == bytes);
    CHECK(sgd.steps("block.0.attention.w_q") == 1);
    CHECK_THROWS_AS(safetensors::load_optimizer(weights, adam), Error);  // not a state file
    CHECK(adam.steps("block.0.attention.w_q") == 2);
  }
  fs::remove(weights);
  fs::remove(state);
}

// Run by CTest after tests/training/write_safetensors.py has written the file named by
// EFFATTN_PYTHON_SAFETENSORS (registered only when python3 with NumPy is present).
TEST_CASE("safetensors: a file written by hand with NumPy loads into a Linear", "[.python]") {
  const char* file = std::getenv("EFFATTN_PYTHON_SAFETENSORS");
  REQUIRE(file != nullptr);
  Linear<float> linear({.d_in = 3, .d_out = 4});
  safetensors::load(file, linear);
  const auto p = parameters(linear);
  for (Index i = 0; i < 3; ++i)
    for (Index j = 0; j < 4; ++j)
      CHECK(p.at("w")(i, j) == 0.5 * double(4 * i + j) - 1);
  for (Index j = 0; j < 4; ++j)
    CHECK(p.at("b")(0, j) == 0.25 * double(j) + 2);
}

namespace {
// A file of an 8-byte header length, `header` and `data`, as a hostile writer would make it.
void write_raw(const fs::path& file, const std::string& header, const std::string& data = "") {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  const std::uint64_t n = header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header << data;
}

// The Error a load gives (its argument and message), or "none".
template <class Load>
std::pair<std::string, std::string> error_of(Load&& load) {
  try {
    load();
  } catch (const Error& e) {
    return {e.argument(), e.what()};
  }
  return {"none", ""};
}
}  // namespace

TEST_CASE("safetensors: hostile headers are Errors, not crashes, and change nothing",
          "[training]") {
  const fs::path file = temp_file("hostile");
  Linear<float> model({.d_in = 3, .d_out = 4, .seed = 5});
  Adam<float> adam({.lr = 1e-2});
  const auto before = all_parameters(model);
  auto load = [&] { return error_of([&] { safetensors::load(file, model); }); };
  auto load_state = [&] { return error_of([&] { safetensors::load_optimizer(file, adam); }); };
  const std::string w_entry = R"("w":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]})";

  SECTION("JSON nested 75,000 deep, inside an otherwise valid entry") {
    // Segfaulted in the serialiser's recursion (the entry was dumped on the success path).
    const std::string deep = std::string(75000, '[') + std::string(75000, ']');
    write_raw(file, R"({"w":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48],"x":)" + deep + "}}",
              std::string(48, '\0'));
    for (const auto& [argument, message] : {load(), load_state()}) {
      CHECK(argument == "header");
      CHECK(message.find("deeper than 128") != std::string::npos);
    }
    // 128 levels are allowed (unknown fields are skipped), then the model is checked.
    const std::string ok = std::string(125, '[') + std::string(125, ']');
    write_raw(file,
              "{" + w_entry + R"(,"b":{"dtype":"F32","shape":[4],"data_offsets":[48,64],"x":)" +
                  ok + "}}",
              std::string(64, '\0'));
    Linear<float> other({.d_in = 3, .d_out = 4});
    CHECK(error_of([&] { safetensors::load(file, other); }).first == "none");
  }
  SECTION("an error quotes at most a short part of a huge name or value") {
    const std::string huge(1 << 20, 'x');
    write_raw(file, R"({")" + huge + R"(":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})",
              std::string(4, '\0'));
    const auto [argument, message] = load();
    CHECK(argument.starts_with("tensor 'xxx"));
    CHECK(message.size() < 1000);
    write_raw(file, R"({"w":{"dtype":")" + huge + R"(","shape":[1],"data_offsets":[0,4]}})",
              std::string(4, '\0'));
    const auto [argument1, message1] = load();
    CHECK(argument1 == "tensor 'w'");
    CHECK(message1.size() < 1000);
    write_raw(file, R"({"w":{"dtype":"F32","shape":")" + huge + R"(","data_offsets":[0,4]}})");
    const auto [argument2, message2] = load();
    CHECK(argument2 == "tensor 'w'.shape");
    CHECK(message2.size() < 1000);
  }
  SECTION("entries that are not what the format says") {
    const std::pair<std::string, std::string> cases[] = {
        {R"({"w":5})", "tensor 'w'"},
        {R"({"w":{"shape":[3,4],"data_offsets":[0,48]}})", "tensor 'w'.dtype"},
        {R"({"w":{"dtype":"F32","data_offsets":[0,48]}})", "tensor 'w'.shape"},
        {R"({"w":{"dtype":"F32","shape":[3,-4],"data_offsets":[0,48]}})", "tensor 'w'.shape"},
        {R"({"w":{"dtype":"F32","shape":[3,4.5],"data_offsets":[0,48]}})", "tensor 'w'.shape"},
        {R"({"w":{"dtype":"F32","shape":[3,4],"data_offsets":[0]}})", "tensor 'w'.data_offsets"},
        {R"({"w":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48,1]}})",
         "tensor 'w'.data_offsets"},
        {R"({"w":{"dtype":"F32","shape":[3,4],"data_offsets":[48,0]}})", "tensor 'w'.data_offsets"},
        {"{" + w_entry + "," + w_entry + "}", "tensor 'w'"},  // named twice
        {R"([1,2])", "header"},
        {R"("text")", "header"},
        {R"({"w":)", "header"},
        {"{" + w_entry + "} trailing", "header"},
    };
    for (const auto& [header, argument] : cases) {
      CAPTURE(header);
      write_raw(file, header, std::string(48, '\0'));
      CHECK(load().first == argument);
    }
  }
  SECTION("shapes whose sizes overflow") {
    // [2^62, 1] in F32 wrapped the byte count to 0; [2^32, 2^32] overflowed rows × cols.
    for (const std::string shape :
         {"[4611686018427387904,1]", "[4294967296,4294967296]", "[4294967296,4294967296,16]"}) {
      CAPTURE(shape);
      write_raw(
          file,
          R"({"__metadata__":{"steps.w":"1"},"w.exp_avg":{"dtype":"F32","shape":)" + shape +
              R"(,"data_offsets":[0,0]},"w.exp_avg_sq":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
          std::string(4, '\0'));
      CHECK(load_state().first == "tensor 'w.exp_avg'.shape");
      CHECK(load().first == "tensor 'w.exp_avg'.shape");
    }
  }
  SECTION("step counts out of range") {
    for (const std::string steps :
         {"9223372036854775807", "99999999999999999999999", "-3", "", "1e3", "9007199254740993"}) {
      CAPTURE(steps);
      write_raw(
          file,
          R"({"__metadata__":{"steps.w":")" + steps +
              R"("},"w.exp_avg":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w.exp_avg_sq":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
          std::string(8, '\0'));
      CHECK(load_state().first == "metadata 'steps.w'");
    }
    CHECK(adam.state_bytes() == 0);
  }
  SECTION("a path that is not a regular file") {
    CHECK(error_of([&] { safetensors::load(fs::temp_directory_path(), model); }).first == "path");
    CHECK(error_of([&] { safetensors::load("/dev/null", model); }).first == "path");
    const fs::path fifo = fs::temp_directory_path() / "effattn_test_fifo.safetensors";
    fs::remove(fifo);
    REQUIRE(std::system(("mkfifo " + fifo.string()).c_str()) == 0);
    CHECK(error_of([&] { safetensors::load(fifo, model); }).first == "path");  // no hang
    CHECK(error_of([&] { safetensors::load_optimizer(fifo, adam); }).first == "path");
    fs::remove(fifo);
  }
  CHECK(all_parameters(model) == before);
  CHECK(adam.state_bytes() == 0);
  fs::remove(file);
}

TEST_CASE("safetensors: a non-strict load takes what matches and reports the rest", "[training]") {
  const fs::path file = temp_file("non_strict");
  SECTION("exact attention's checkpoint into a Linformer block: E and F are missing") {
    MultiHeadAttention<FullAttention<float>> full({.d_model = 8, .heads = 2, .seed = 1});
    safetensors::save(file, full);
    MultiHeadAttention<LowRank<float>> low(
        {.d_model = 8, .heads = 2, .seed = 2, .policy = {.projection = {.k = 4, .n_max = 16}}});
    const auto before = layer_testing::parameters(low);
    try {  // strictly: an Error that says how to load what matches, and nothing changes
      safetensors::load(file, low);
      FAIL("a strict load of a checkpoint without E and F succeeded");
    } catch (const Error& e) {
      CHECK(e.argument() == "tensor 'E'");
    }
    CHECK(layer_testing::parameters(low) == before);

    const auto report = safetensors::load(file, {.strict = false}, low);
    CHECK(report.missing == std::vector<std::string>{"E", "F"});
    CHECK(report.unexpected.empty());
    CHECK(report.mismatched.empty());
    CHECK(!report.complete());
    const auto source = layer_testing::parameters(full), loaded = layer_testing::parameters(low);
    CHECK(report.loaded.size() == source.size());
    for (const auto& name : report.loaded)
      CHECK(loaded.at(name) == source.at(name));
    CHECK(loaded.at("E") == before.at("E"));  // kept as it was
    CHECK(loaded.at("F") == before.at("F"));
    CHECK_THAT(report.summary(), Catch::Contains("loaded 8 of 10 parameters") &&
                                     Catch::Contains("missing from the file (2):\n  E\n  F"));
  }
  SECTION("a tensor of another shape or dtype, and one the model does not have") {
    Linear<float> saved({.d_in = 3, .d_out = 4, .seed = 1});
    safetensors::save(file, saved);
    Linear<float> wider({.d_in = 3, .d_out = 6, .bias = false, .seed = 2});
    const auto before = layer_testing::parameters(wider);
    const auto report = safetensors::load(file, {.strict = false}, wider);
    CHECK(report.loaded.empty());
    CHECK(report.missing.empty());
    REQUIRE(report.mismatched.size() == 1);
    CHECK(report.mismatched[0] == "w: [3, 4] F32 in the file, [3, 6] F32 in the model");
    CHECK(report.unexpected == std::vector<std::string>{"b"});
    CHECK(layer_testing::parameters(wider) == before);
    Linear<double> twin({.d_in = 3, .d_out = 4});
    const auto by_dtype = safetensors::load(file, {.strict = false}, twin);
    CHECK(by_dtype.mismatched.size() == 2);
    CHECK_THAT(by_dtype.mismatched[0],
               Catch::Contains("F32 in the file") && Catch::Contains("F64 in the model"));
  }
  SECTION("strictly, one Error names the first mismatch and lists every other") {
    MultiHeadAttention<FullAttention<float>> small({.d_model = 8, .heads = 2, .seed = 1});
    safetensors::save(file, small);
    MultiHeadAttention<FullAttention<float>> wide({.d_model = 12, .heads = 2, .seed = 1});
    try {
      safetensors::load(file, wide);
      FAIL("a strict load of another width succeeded");
    } catch (const Error& e) {
      CHECK(e.argument() == "tensor 'w_q'");
      // w_q is the first; the other seven follow.
      CHECK_THAT(e.what(), Catch::Contains("of shape [8, 8]; and 7 more:") &&
                               Catch::Contains("tensor 'b_o' of shape [1, 8];"));
    }
  }
  SECTION("a malformed file is an Error in either mode") {
    std::ofstream(file, std::ios::binary | std::ios::trunc) << "hello";
    Linear<float> model({.d_in = 3, .d_out = 4});
    CHECK_THROWS_AS(safetensors::load(file, {.strict = false}, model), Error);
  }
  fs::remove(file);
}

TEST_CASE("safetensors: a prefix loads one block out of a whole model's checkpoint", "[training]") {
  Model model(model_config(1));
  const fs::path file = temp_file("prefix");
  safetensors::save(file, model);
  Residual<PreNorm<MultiHeadAttention<FullAttention<float>>>> block(model_config(7).block);
  // Strict within the prefix: every parameter of the block, and the other block's tensors are
  // not unexpected.
  const auto report = safetensors::load(file, {.prefix = "block.1."}, block);
  CHECK(report.complete());
  const auto whole = layer_testing::parameters(model), one = layer_testing::parameters(block);
  REQUIRE(!one.empty());
  for (const auto& [name, value] : one)
    CHECK(value == whole.at("block.1." + name));
  CHECK(report.loaded.size() == one.size());
  // A prefix the file does not have: strictly an Error; otherwise everything is missing.
  CHECK_THROWS_AS(safetensors::load(file, {.prefix = "block.9."}, block), Error);
  const auto none = safetensors::load(file, {.strict = false, .prefix = "block.9."}, block);
  CHECK(none.loaded.empty());
  CHECK(none.missing.size() == one.size());
  CHECK(none.unexpected.empty());
  CHECK(layer_testing::parameters(block) == one);
  fs::remove(file);
}

namespace {
// A two-block stack of one policy, and its output on fixed input.
template <class Policy, class Masking = Bidirectional>
using Stack = Repeat<Residual<PreNorm<MultiHeadAttention<Policy, Masking>>>>;

template <class Policy, class Masking = Bidirectional>
typename Stack<Policy, Masking>::Config stack_config(std::uint64_t seed,
                                                     typename Policy::Config policy = {}) {
  typename Stack<Policy, Masking>::Config c;
  c.depth = 2;
  c.block.layer.layer = {.d_model = 16, .heads = 2, .seed = seed, .policy = policy};
  return c;
}

template <class Model>
Matrix<float> output_of(Model& model, Index n) {
  const SequenceShape shape{2, n};
  Matrix<float> x(shape.tokens(), 16), y(shape.tokens(), 16);
  CounterRng(3).fill_normal(x);
  model.forward(x, y, shape);
  return y;
}

template <class Policy, class Masking = Bidirectional>
void save_redraw_load(typename Policy::Config policy, Index n) {
  Stack<Policy, Masking> model(stack_config<Policy, Masking>(1, policy));
  redraw(model, 42);  // a state the seeds alone do not give
  const Matrix<float> before = output_of(model, n);
  const fs::path file = temp_file("random_state");
  safetensors::save(file, model);
  redraw(model, 43);
  REQUIRE(!(output_of(model, n).array() == before.array()).all());  // the redraw changed it
  const auto report = safetensors::load(file, model);
  CHECK(report.complete());
  CHECK((output_of(model, n).array() == before.array()).all());  // bit for bit
  // And into a fresh model made from another seed.
  Stack<Policy, Masking> fresh(stack_config<Policy, Masking>(9, policy));
  safetensors::load(file, fresh);
  CHECK((output_of(fresh, n).array() == before.array()).all());
  fs::remove(file);
}
}  // namespace

TEST_CASE(
    "safetensors: Favor's features and LSH's rotations are saved: save, redraw, load "
    "computes the same bits",
    "[training][random_state]") {
  save_redraw_load<Favor<float>>({.features = 8}, 24);
  save_redraw_load<Favor<float>, Causal>({.features = 8, .per_head = true}, 24);
  save_redraw_load<LSHAttention<float>>({.chunk = 4, .rounds = 2}, 32);

  // A rotation fixed by hand is kept as a tensor; the others come from the seed.
  using Lsh = MultiHeadAttention<LSHAttention<float>>;
  Lsh lsh({.d_model = 16, .heads = 2, .seed = 1, .policy = {.chunk = 4, .rounds = 2}});
  Matrix<float> r(8, 8);  // d_k × the 8 columns of 16 buckets (n = 32, chunks of 4)
  CounterRng(5).fill_normal(r);
  lsh.policy().set_rotation(1, 0, r);
  const Matrix<float> before = output_of(lsh, 32);
  const fs::path file = temp_file("rotation");
  safetensors::save(file, lsh);
  redraw(lsh, 7);
  const auto report = safetensors::load(file, lsh);
  CHECK(report.complete());
  CHECK(std::count(report.loaded.begin(), report.loaded.end(), "rotation.1.0") == 1);
  CHECK(std::count(report.loaded.begin(), report.loaded.end(), "seed") == 1);
  CHECK(lsh.policy().rotation(1, 0, 8) == r);
  CHECK((output_of(lsh, 32).array() == before.array()).all());
  fs::remove(file);
}

TEST_CASE("redraw reaches every Favor and LSH block of a model, each with its own draw",
          "[training][random_state]") {
  using Model = Stack<Favor<float>>;
  Model a(stack_config<Favor<float>>(1, {.features = 8}));
  Model b(stack_config<Favor<float>>(1, {.features = 8}));
  const auto features = [](Model& m, Index block) {
    Matrix<float> w;
    m.visit_random_state([&](std::string_view path, auto& policy) {
      if (path == "block." + std::to_string(block) + ".attention") w = policy.projection(0);
    });
    return w;
  };
  const Matrix<float> first = features(a, 0);
  REQUIRE(first.size() > 0);
  redraw(a, 5);
  redraw(b, 5);
  CHECK(features(a, 0) != first);           // redrawn
  CHECK(features(a, 0) != features(a, 1));  // each block its own draw
  CHECK(features(a, 0) == features(b, 0));  // the same seed, the same model
  CHECK(features(a, 1) == features(b, 1));
  redraw(b, 6);
  CHECK(features(a, 0) != features(b, 0));
  // A model without random state is left as it was.
  Linear<float> linear({.d_in = 3, .d_out = 4, .seed = 1});
  const auto weights = layer_testing::parameters(linear);
  redraw(linear, 5);
  CHECK(layer_testing::parameters(linear) == weights);
}

TEST_CASE(
    "safetensors: exact attention's checkpoint into Favor: strictly an Error, else the "
    "model keeps its features",
    "[training][random_state]") {
  Stack<FullAttention<float>> full(stack_config<FullAttention<float>>(1));
  const fs::path file = temp_file("full_to_favor");
  safetensors::save(file, full);
  Stack<Favor<float>> favor(stack_config<Favor<float>>(2, {.features = 8}));
  try {
    safetensors::load(file, favor);
    FAIL("a strict load without Favor's features succeeded");
  } catch (const Error& e) {
    CHECK(e.argument() == "random state 'block.0.attention'");
    CHECK_THAT(e.what(), Catch::Contains("strict = false"));
  }
  const auto report = safetensors::load(file, {.strict = false}, favor);
  CHECK(report.missing ==
        std::vector<std::string>{"block.0.attention.features", "block.1.attention.features"});
  CHECK(report.unexpected.empty());
  CHECK(report.mismatched.empty());
  const auto source = layer_testing::parameters(full), loaded = layer_testing::parameters(favor);
  CHECK(source == loaded);  // every parameter: the policies have none of their own
  // Features of another shape: mismatched, not loaded.
  Stack<Favor<float>> per_head(stack_config<Favor<float>>(2, {.features = 8, .per_head = true}));
  safetensors::save(file, favor);
  const auto other = safetensors::load(file, {.strict = false}, per_head);
  REQUIRE(other.mismatched.size() == 2);
  CHECK_THAT(other.mismatched[0], Catch::StartsWith("block.0.attention: 1 feature matrices"));
  CHECK_THROWS_AS(safetensors::load(file, per_head), Error);
  fs::remove(file);
}

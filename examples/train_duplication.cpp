// The duplication task of the Reformer paper (Kitaev et al. 2020, §5): sequences 0 w 0 w, w
// random symbols from 1 … N, a one-layer causal language model trained to predict the next
// symbol, loss and accuracy counted on the second copy only (the first is unpredictable).
//
// Every model is shared-QK attention (keys = normalised queries, as LSH attention needs), so a
// model trained with one attention can be evaluated with another: "full" is exact shared-QK
// attention (LSHAttention with one bucket and one chunk: every earlier token is a key),
// "lsh-r" is LSH attention with r hash rounds. After training full, lsh-4, lsh-2 and lsh-1
// (and Favor, which is not shared-QK and is evaluated with itself), the program evaluates each
// model with every attention and prints the paper's Table 2: train × eval accuracy.
//
// Usage: train_duplication [--quick | --smoke] [--length L] [--vocab N] [--steps S] [--batch B]
// [--d D]
//                          [--chunk C] [--lr R] [--eval-batches E] [--policies full,lsh-4,…]
// --quick (about two minutes on 2 cores) trains full and lsh-4 for 1200 steps instead of 2000. A
// progress line every 5 s; the last lines read "accuracy <policy>: <value>%", each model
// evaluated with its own attention on held-out batches. Exit status 1 if "full" was trained
// and stays below 90 %. --smoke (for the sanitizers) trains full and lsh-4 for 30 steps and
// evaluates on 2 batches; its exit status is 1 if a model's training loss did not fall.
#include <effattn/effattn.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using namespace effattn;

namespace {

struct Options {
  Index length = 64;  // tokens per sequence: 0 w 0 w with |w| = length/2 − 1
  Index vocab = 32;   // symbols 1 … vocab − 1, 0 the separator
  Index d = 64, heads = 4, batch = 16, chunk = 16, eval_batches = 8;
  std::int64_t steps = 2000;
  double lr = 3e-3;
  std::vector<std::string> policies{"full", "lsh-4", "lsh-2", "lsh-1", "favor"};
  bool smoke = false;
};

// Sequences 0 w 0 w; targets are the next tokens on the second copy, −100 elsewhere.
void make_batch(std::uint64_t seed, std::int64_t index, const Options& o,
                std::vector<std::int32_t>& ids, std::vector<std::int32_t>& targets) {
  const Index half = o.length / 2;
  ids.assign(std::size_t(o.batch * o.length), 0);
  targets.assign(ids.size(), -100);
  Matrix<float> u(o.batch, half);
  CounterRng(seed, std::uint64_t(index)).fill_uniform(u, 0.0, 1.0);  // batch `index` of `seed`
  for (Index b = 0; b < o.batch; ++b) {
    const std::size_t row = std::size_t(b * o.length);
    for (Index i = 1; i < half; ++i) {
      const auto w = std::int32_t(1 + Index(u(b, i) * float(o.vocab - 1)) % (o.vocab - 1));
      ids[row + std::size_t(i)] = ids[row + std::size_t(half + i)] = w;
    }
    for (Index t = half; t + 1 < o.length; ++t)
      targets[row + std::size_t(t)] = ids[row + std::size_t(t + 1)];
  }
}

// Embedding, learned positions, one pre-norm attention block and one feed-forward block, a
// final norm and a head: the paper's one-layer model, with the attention as a parameter.
// (Learned positions: a shared-QK layer must make position p's query meet position
// p − length/2 + 1's key; sinusoidal ones make that slow to learn in one layer.)
template <class Attention>
struct LanguageModel {
  using Body = Sequential<LearnedPositions<float>, Residual<PreNorm<Attention>>,
                          Residual<PreNorm<FeedForward<float>>>, LayerNorm<float>>;
  Embedding<float> embed;
  Body body;
  Linear<float> head;

  LanguageModel(const Options& o, typename Attention::Config attention)
      : embed({.vocab = o.vocab, .d_model = o.d, .seed = 1}),
        body({.d_model = o.d, .max_positions = o.length, .seed = 5},
             {.layer = {.layer = attention}}, {.layer = {.layer = {.d_model = o.d, .seed = 3}}},
             {.d_model = o.d}),
        head({.d_in = o.d, .d_out = o.vocab, .seed = 4}) {}

  template <class F>
  void visit_parameters(F&& f) {  // one model for the optimiser: embed.…, body.…, head.…
    embed.visit_parameters(
        [&](std::string_view n, auto& w, auto& g) { f(path("embed", n), w, g); });
    body.visit_parameters([&](std::string_view n, auto& w, auto& g) { f(path("body", n), w, g); });
    head.visit_parameters([&](std::string_view n, auto& w, auto& g) { f(path("head", n), w, g); });
  }
  static std::string path(const char* part, std::string_view name) {
    return std::string(part) + "." + std::string(name);
  }
};
template <class Attention>
struct Trainer {
  LanguageModel<Attention> model;
  using Scalar = float;
  const Options& o;
  Matrix<float> x, h, dh, dx;
  std::vector<std::int32_t> ids, targets;

  Trainer(const Options& options, typename Attention::Config attention)
      : model(options, attention), o(options) {
    const Index tokens = o.batch * o.length;
    x.resize(tokens, o.d), h.resize(tokens, o.d), dh.resize(tokens, o.d), dx.resize(tokens, o.d);
  }
  template <class F>
  void visit_parameters(F&& f) {
    model.visit_parameters(f);
  }
  SequenceShape shape() const { return {.batch = o.batch, .seq = o.length}; }

  CrossEntropy step(std::int64_t index, AdamW<float>& opt) {
    make_batch(7, index, o, ids, targets);  // training data: stream 7
    model.embed.forward(ids, x);
    model.body.forward(x, h, shape());
    const CrossEntropy loss = chunked_cross_entropy(h, model.head, targets, dh);
    model.body.backward(x, dh, dx, shape());
    model.embed.backward(ids, dx);
    clip_grad_norm(1.0, *this);
    opt.step(*this);
    model.embed.zero_grad(), model.body.zero_grad(), model.head.zero_grad();
    return loss;
  }
  CrossEntropy evaluate(std::uint64_t seed) {
    CrossEntropy total;
    model.body.set_training(false);
    for (Index i = 0; i < o.eval_batches; ++i) {
      make_batch(seed, i, o, ids, targets);  // held-out data: another stream
      model.embed.forward(ids, x);
      model.body.forward(x, h, shape());
      const CrossEntropy part = chunked_cross_entropy(h, model.head, targets);
      total.sum += part.sum, total.counted += part.counted, total.correct += part.correct;
    }
    model.body.set_training(true);
    return total;
  }
  // Copies every parameter from another model of the same structure (another attention).
  template <class Other>
  void copy_from(Trainer<Other>& other) {
    std::vector<Matrix<float>*> source;
    other.visit_parameters([&](std::string_view, auto& w, auto&) { source.push_back(&w); });
    std::size_t i = 0;
    visit_parameters([&](std::string_view, auto& w, auto&) { w = *source.at(i++); });
  }
};

using Shared = MultiHeadAttention<LSHAttention<float>, Causal>;
using Performer = MultiHeadAttention<Favor<float>, Causal>;

Shared::Config shared_config(const Options& o, const std::string& name) {
  Shared::Config c{.d_model = o.d, .heads = o.heads, .seed = 2};
  if (name == "full")  // one bucket, one chunk: exact shared-QK attention
    c.policy = {.chunk = o.length, .rounds = 1, .buckets = 1};
  else
    c.policy = {.chunk = o.chunk, .rounds = std::stoi(name.substr(4))};
  return c;
}

// Returns whether the training loss fell: the last 10 steps' mean below the first step's.
template <class Attention>
bool train(Trainer<Attention>& t, const std::string& name, const Options& o) {
  AdamW<float> opt({.lr = o.lr, .weight_decay = 0.01});
  t.model.body.set_training(true);
  const auto start = std::chrono::steady_clock::now();
  auto last = start;
  CrossEntropy window, last_steps;
  double first = 0;
  for (std::int64_t step = 0; step < o.steps; ++step) {
    opt.set_lr(o.lr * cosine_decay(step, o.steps / 20, o.steps, 0.1));
    const CrossEntropy loss = t.step(step, opt);
    if (step == 0) first = loss.mean();
    if (step + 10 >= o.steps) last_steps.sum += loss.sum, last_steps.counted += loss.counted;
    window.sum += loss.sum, window.counted += loss.counted, window.correct += loss.correct;
    const auto now = std::chrono::steady_clock::now();
    if (now - last > std::chrono::seconds(5) || step + 1 == o.steps) {
      const double elapsed = std::chrono::duration<double>(now - start).count();
      const double tokens = double((step + 1) * o.batch * o.length);
      std::printf(
          "%-6s step %5lld/%lld  loss %.3f  accuracy %5.1f %%  %6.0f tokens/s  ETA %4.0f s\n",
          name.c_str(), static_cast<long long>(step + 1), static_cast<long long>(o.steps),
          window.mean(), 100 * window.accuracy(), tokens / elapsed,
          elapsed / double(step + 1) * double(o.steps - step - 1));
      std::fflush(stdout);
      window = {};
      last = now;
    }
  }
  return last_steps.mean() < first;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i)  // --quick first: the flags after it may change its sizes
    if (std::string(argv[i]) == "--quick") {
      o.steps = 1200;
      o.policies = {"full", "lsh-4"};
    } else if (std::string(argv[i]) == "--smoke") {
      o.steps = 30, o.eval_batches = 2, o.smoke = true;
      o.policies = {"full", "lsh-4"};
    }
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) throw Error("train_duplication", arg, "without a value", "a value");
      return std::string(argv[++i]);
    };
    if (arg == "--quick" || arg == "--smoke")
      continue;
    else if (arg == "--length")
      o.length = std::stol(value());
    else if (arg == "--vocab")
      o.vocab = std::stol(value());
    else if (arg == "--steps")
      o.steps = std::stoll(value());
    else if (arg == "--batch")
      o.batch = std::stol(value());
    else if (arg == "--d")
      o.d = std::stol(value());
    else if (arg == "--chunk")
      o.chunk = std::stol(value());
    else if (arg == "--lr")
      o.lr = std::stod(value());
    else if (arg == "--eval-batches")
      o.eval_batches = std::stol(value());
    else if (arg == "--policies") {
      o.policies.clear();
      std::stringstream list(value());
      for (std::string p; std::getline(list, p, ',');)
        o.policies.push_back(p);
    } else
      throw Error("train_duplication", arg, "unknown",
                  "--quick, --smoke, --length, --vocab, --steps, "
                  "--batch, --d, --chunk, --lr, --eval-batches or --policies");
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  std::printf(
      "duplication task: length %lld (w of %lld symbols from 1..%lld), d_model %lld, "
      "%lld heads, batch %lld, %lld steps, LSH chunks of %lld, lr %g\n",
      static_cast<long long>(o.length), static_cast<long long>(o.length / 2 - 1),
      static_cast<long long>(o.vocab - 1), static_cast<long long>(o.d),
      static_cast<long long>(o.heads), static_cast<long long>(o.batch),
      static_cast<long long>(o.steps), static_cast<long long>(o.chunk), o.lr);
  const std::vector<std::string> evals{"full", "lsh-8", "lsh-4", "lsh-2", "lsh-1"};
  std::map<std::string, std::map<std::string, double>> table;
  bool all_fell = true;
  for (const std::string& name : o.policies) {
    if (name == "favor") {
      Trainer<Performer> t(o, {.d_model = o.d, .heads = o.heads, .seed = 2});
      all_fell &= train(t, name, o);
      table[name]["favor"] = t.evaluate(99).accuracy();
      continue;
    }
    Trainer<Shared> t(o, shared_config(o, name));
    all_fell &= train(t, name, o);
    for (const std::string& eval : evals) {
      Trainer<Shared> e(o, shared_config(o, eval));
      e.copy_from(t);
      table[name][eval] = e.evaluate(99).accuracy();
    }
  }
  std::printf("\nsecond-copy accuracy (%%), trained with (rows) × evaluated with (columns):\n");
  std::printf("%-8s", "train");
  for (const auto& e : evals)
    std::printf("%8s", e.c_str());
  std::printf("%8s\n", "favor");
  for (const auto& [name, row] : table) {
    std::printf("%-8s", name.c_str());
    for (const auto& e : evals)
      row.count(e) ? std::printf("%8.1f", 100 * row.at(e)) : std::printf("%8s", "-");
    row.count("favor") ? std::printf("%8.1f\n", 100 * row.at("favor")) : std::printf("%8s\n", "-");
  }
  for (const auto& [name, row] : table)
    std::printf("accuracy %s: %.1f%%\n", name.c_str(),
                100 * row.at(name == "favor" ? "favor" : name));
  // Exit status 1 if exact attention, when trained, did not learn to copy (≥ 90 %); in a smoke
  // run, if a training loss did not fall.
  if (o.smoke) return all_fell ? 0 : 1;
  return table.count("full") && table["full"]["full"] < 0.9 ? 1 : 0;
} catch (const Error& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 2;
}

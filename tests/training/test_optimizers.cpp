// Sgd, Adam and AdamW against naive double references of their update rules, their state
// keyed by parameter path, and failed steps that change nothing.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "effattn/effattn.hpp"
#include "effattn/training/adam.hpp"
#include "effattn/training/adamw.hpp"
#include "effattn/training/sgd.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

// Parameters without a layer around them: named tensors and their gradients, visited in
// order or in reverse.
template <class S>
struct Tensors {
  using Scalar = S;
  std::vector<std::string> names;
  std::vector<Matrix<S>> values, grads;
  bool reversed = false;
  template <class F>
  void visit_parameters(F&& f) {
    for (std::size_t j = 0; j < names.size(); ++j) {
      const std::size_t i = reversed ? names.size() - 1 - j : j;
      f(std::string_view(names[i]), values[i], grads[i]);
    }
  }
};

template <class S>
Tensors<S> tensors(std::uint64_t seed) {
  Tensors<S> t;
  t.names = {"block.0.w", "block.0.b", "head"};
  const Index shapes[3][2] = {{3, 4}, {1, 4}, {4, 2}};
  for (int i = 0; i < 3; ++i) {
    Matrix<S> v(shapes[i][0], shapes[i][1]);
    CounterRng(seed + i).fill_normal(v);
    t.values.push_back(v);
    t.grads.push_back(Matrix<S>::Zero(v.rows(), v.cols()));
  }
  return t;
}

// Gradient of step s: fixed random values, different each step and parameter.
template <class S>
void set_grads(Tensors<S>& t, int s) {
  for (std::size_t i = 0; i < t.values.size(); ++i)
    CounterRng(100 + s, i).fill_normal(t.grads[i], 0.7);
}

struct SgdRef {
  double lr, mu, damp, wd;
  bool nesterov;
  std::vector<MatD> buf;
  void step(std::vector<MatD>& w, const std::vector<MatD>& g, int t) {
    buf.resize(w.size());
    for (std::size_t i = 0; i < w.size(); ++i) {
      if (t == 0) buf[i] = MatD::Zero(w[i].rows(), w[i].cols());
      for (Index r = 0; r < w[i].rows(); ++r)
        for (Index c = 0; c < w[i].cols(); ++c) {
          double d = g[i](r, c) + wd * w[i](r, c);
          if (mu != 0) {
            double& b = buf[i](r, c);
            b = t == 0 ? d : mu * b + (1 - damp) * d;
            d = nesterov ? d + mu * b : b;
          }
          w[i](r, c) -= lr * d;
        }
    }
  }
};

struct AdamRef {
  double lr, b1, b2, eps, wd;
  bool decoupled;
  std::vector<MatD> m, v;
  void step(std::vector<MatD>& w, const std::vector<MatD>& g, int t) {  // t from 1
    m.resize(w.size());
    v.resize(w.size());
    for (std::size_t i = 0; i < w.size(); ++i) {
      if (t == 1) {
        m[i] = MatD::Zero(w[i].rows(), w[i].cols());
        v[i] = m[i];
      }
      for (Index r = 0; r < w[i].rows(); ++r)
        for (Index c = 0; c < w[i].cols(); ++c) {
          double d = g[i](r, c);
          if (decoupled)
            w[i](r, c) *= 1 - lr * wd;
          else
            d += wd * w[i](r, c);
          m[i](r, c) = b1 * m[i](r, c) + (1 - b1) * d;
          v[i](r, c) = b2 * v[i](r, c) + (1 - b2) * d * d;
          const double mh = m[i](r, c) / (1 - std::pow(b1, t));
          const double vh = v[i](r, c) / (1 - std::pow(b2, t));
          w[i](r, c) -= lr * mh / (std::sqrt(vh) + eps);
        }
    }
  }
};

template <class S>
std::vector<MatD> as_double(const std::vector<Matrix<S>>& ms) {
  std::vector<MatD> out;
  for (const auto& m : ms)
    out.push_back(m.template cast<double>());
  return out;
}

double max_error(const std::vector<MatD>& a, const std::vector<MatD>& b) {
  double e = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    e = std::max(e, (a[i] - b[i]).cwiseAbs().maxCoeff() / (1 + b[i].cwiseAbs().maxCoeff()));
  return e;
}

template <class S, class Opt, class Ref>
double run_against(Opt opt, Ref ref, int steps, int t0) {
  auto t = tensors<S>(7);
  auto w = as_double(t.values);
  for (int s = 0; s < steps; ++s) {
    set_grads(t, s);
    opt.step(t);
    ref.step(w, as_double(t.grads), s + t0);
  }
  return max_error(as_double(t.values), w);
}

}  // namespace

TEST_CASE("Sgd matches torch.optim.SGD's update rule", "[training]") {
  struct Case {
    double mu, damp, wd;
    bool nesterov;
  };
  for (const Case c : {Case{0, 0, 0, false}, Case{0, 0, 0.1, false}, Case{0.9, 0, 0, false},
                       Case{0.9, 0.3, 0.05, false}, Case{0.8, 0, 0.05, true}}) {
    INFO("momentum " << c.mu << " dampening " << c.damp << " decay " << c.wd << " nesterov "
                     << c.nesterov);
    const Sgd<double>::Config cd{.lr = 0.05,
                                 .momentum = c.mu,
                                 .dampening = c.damp,
                                 .nesterov = c.nesterov,
                                 .weight_decay = c.wd};
    const SgdRef ref{0.05, c.mu, c.damp, c.wd, c.nesterov, {}};
    CHECK(run_against<double>(Sgd<double>(cd), ref, 6, 0) < 1e-14);
    const Sgd<float>::Config cf{.lr = 0.05,
                                .momentum = c.mu,
                                .dampening = c.damp,
                                .nesterov = c.nesterov,
                                .weight_decay = c.wd};
    CHECK(run_against<float>(Sgd<float>(cf), ref, 6, 0) < 1e-5);
  }
}

TEST_CASE("Adam and AdamW match torch.optim's update rules, bias correction included",
          "[training]") {
  for (const double wd : {0.0, 0.1}) {
    INFO("weight decay " << wd);
    const AdamRef adam{2e-2, 0.9, 0.999, 1e-8, wd, false, {}, {}};
    CHECK(run_against<double>(Adam<double>({.lr = 2e-2, .weight_decay = wd}), adam, 7, 1) < 1e-13);
    CHECK(run_against<float>(Adam<float>({.lr = 2e-2, .weight_decay = wd}), adam, 7, 1) < 1e-5);
    const AdamRef adamw{2e-2, 0.8, 0.99, 1e-6, wd, true, {}, {}};
    CHECK(run_against<double>(
              AdamW<double>(
                  {.lr = 2e-2, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .weight_decay = wd}),
              adamw, 7, 1) < 1e-13);
  }
  // Bias correction: the first step moves every weight by lr·g/(|g| + ε/…) ≈ lr, whatever |g|.
  auto t = tensors<double>(3);
  set_grads(t, 0);
  t.grads[0] *= 1e-3;
  const auto before = t.values;
  Adam<double>({.lr = 0.01, .eps = 1e-12}).step(t);
  for (std::size_t i = 0; i < t.values.size(); ++i)
    CHECK((t.values[i] - before[i]).cwiseAbs().minCoeff() > 0.01 * (1 - 1e-4));
  // AdamW's default decay is PyTorch's.
  CHECK(AdamW<float>({}).config().weight_decay == 0.01);
  CHECK(AdamW<float>({}).config().decoupled_weight_decay);
}

TEST_CASE("Optimiser state is keyed by parameter path, not by visiting order", "[training]") {
  auto a = tensors<double>(5), b = tensors<double>(5);
  b.reversed = true;
  Adam<double> oa({.lr = 0.03}), ob({.lr = 0.03});
  Sgd<double> sa({.lr = 0.03, .momentum = 0.9}), sb({.lr = 0.03, .momentum = 0.9});
  for (int s = 0; s < 5; ++s) {
    set_grads(a, s);
    set_grads(b, s);
    b.reversed = s % 2 == 1;  // b's order changes every step
    oa.step(a);
    ob.step(b);
    sa.step(a);
    sb.step(b);
  }
  for (std::size_t i = 0; i < a.values.size(); ++i)
    CHECK(a.values[i] == b.values[i]);
  CHECK(oa.steps("block.0.w") == 5);
  CHECK(oa.state_bytes() == 2 * sizeof(double) * (12 + 4 + 8));
  CHECK(sa.state_bytes() == sizeof(double) * (12 + 4 + 8));
  CHECK(Sgd<double>({}).state_bytes() == 0);

  // A parameter that joins later gets its own step count, hence its own bias correction.
  auto late = tensors<double>(9);
  late.names = {"late.w", "late.b", "late.head"};
  set_grads(late, 0);
  const auto before = late.values;
  oa.step(a, late);
  CHECK(oa.steps("late.w") == 1);
  CHECK(oa.steps("block.0.w") == 6);
  CHECK((late.values[0] - before[0]).cwiseAbs().minCoeff() > 0.03 * 0.99);  // a first step
}

TEST_CASE("A failed optimiser step throws effattn::Error and changes nothing", "[training]") {
  auto t = tensors<float>(11);
  Adam<float> adam({.lr = 0.1});
  set_grads(t, 0);
  adam.step(t);
  const auto values = t.values;
  const auto bytes = adam.state_bytes();

  auto expect_unchanged = [&] {
    for (std::size_t i = 0; i < values.size(); ++i)
      CHECK(t.values[i] == values[i]);
    CHECK(adam.steps("block.0.w") == 1);
    CHECK(adam.state_bytes() == bytes);
  };
  SECTION("a gradient shaped unlike its parameter") {
    t.grads[2].resize(2, 4);
    try {
      adam.step(t);
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(e.component() == "Adam");
      CHECK(e.argument() == "gradient of head");
      CHECK(std::string(e.what()).find("2×4") != std::string::npos);
    }
    expect_unchanged();
  }
  SECTION("two parameters with one path") {
    auto other = tensors<float>(12);  // same names
    CHECK_THROWS_AS(adam.step(t, other), Error);
    expect_unchanged();
  }
  SECTION("a parameter shaped unlike its state (another model)") {
    auto other = tensors<float>(12);
    other.values[0].resize(5, 4);
    other.grads[0].setZero(5, 4);
    const auto other_before = other.values;
    try {
      adam.step(other);
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(e.argument() == "parameter 'block.0.w'");
      CHECK(std::string(e.what()).find("reset()") != std::string::npos);
    }
    for (std::size_t i = 0; i < other.values.size(); ++i)
      CHECK(other.values[i] == other_before[i]);
    expect_unchanged();
    adam.reset();
    adam.step(other);  // a new model after reset
    CHECK(adam.steps("block.0.w") == 1);
  }
}

TEST_CASE("Optimiser settings out of range are errors naming the setting", "[training]") {
  auto argument = [](auto make) {
    try {
      make();
    } catch (const Error& e) {
      return e.argument();
    }
    return std::string("none");
  };
  CHECK(argument([] { Sgd<float>({.lr = -1}); }) == "lr");
  CHECK(argument([] { Sgd<float>({.momentum = -0.1}); }) == "momentum");
  CHECK(argument([] { Sgd<float>({.dampening = 2}); }) == "dampening");
  CHECK(argument([] { Sgd<float>({.momentum = 0, .nesterov = true}); }) == "nesterov");
  CHECK(argument([] { Sgd<float>({.weight_decay = NAN}); }) == "weight_decay");
  CHECK(argument([] { Adam<float>({.beta1 = 1}); }) == "beta1");
  CHECK(argument([] { Adam<float>({.beta2 = -0.5}); }) == "beta2");
  CHECK(argument([] { Adam<float>({.eps = 0}); }) == "eps");
  CHECK(argument([] { AdamW<float>({.lr = INFINITY}); }) == "lr");
  Adam<float> adam({});
  CHECK(argument([&] { adam.set_lr(-3); }) == "lr");
  CHECK(adam.lr() == 1e-3);
  adam.set_lr(0.5);
  CHECK(adam.lr() == 0.5);
}

TEST_CASE("An optimiser's state can be read and replaced, checked first", "[training]") {
  auto t = tensors<double>(13);
  Adam<double> adam({.lr = 0.1});
  set_grads(t, 0);
  adam.step(t);
  CHECK(adam.slot_names() == std::vector<std::string_view>{"exp_avg", "exp_avg_sq"});
  CHECK(Sgd<double>({.momentum = 0.5}).slot_names() == std::vector<std::string_view>{"momentum"});
  CHECK(Sgd<double>({}).slot_names().empty());
  auto state = adam.state();
  REQUIRE(state.size() == 3);
  CHECK(state.at("head").steps == 1);
  CHECK(state.at("head").slots[0].isApprox(0.1 * t.grads[2], 1e-14));  // (1 − β1)·g

  auto bad = state;
  bad.at("head").slots.pop_back();
  CHECK_THROWS_AS(adam.set_state(bad), Error);
  bad = state;
  bad.at("head").slots[1].resize(1, 1);
  CHECK_THROWS_AS(adam.set_state(bad), Error);
  bad = state;
  bad.at("head").steps = -1;
  CHECK_THROWS_AS(adam.set_state(bad), Error);
  CHECK(adam.steps("head") == 1);

  state.at("head").steps = 10;
  adam.set_state(state);
  CHECK(adam.steps("head") == 10);
  adam.set_state({});
  CHECK(adam.state_bytes() == 0);
}

TEST_CASE("Non-finite gradients are refused; huge finite ones give finite updates", "[training]") {
  Linear<float> model({.d_in = 3, .d_out = 2, .seed = 1});
  auto parameters = [](auto& m) {
    std::vector<Matrix<float>> values;
    m.visit_parameters([&](std::string_view, auto& w, auto&) { values.push_back(w); });
    return values;
  };
  const auto before = parameters(model);
  auto set_gradient = [&](float value) {
    model.visit_parameters([&](std::string_view, auto&, auto& g) { g.setConstant(value); });
  };
  SECTION("a NaN or ∞ gradient: every optimiser refuses and nothing changes") {
    Adam<float> adam({.lr = 1e-2});
    Sgd<float> sgd({.lr = 1e-2, .momentum = 0.9});
    for (const float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      set_gradient(0.5f);
      model.visit_parameters([&](std::string_view path, auto&, auto& g) {
        if (path == "b") g(0, 1) = bad;
      });
      try {
        adam.step(model);
        FAIL("no error");
      } catch (const Error& e) {
        CHECK(e.argument() == "gradient of b");
      }
      CHECK_THROWS_AS(sgd.step(model), Error);
      CHECK(parameters(model) == before);
      CHECK(adam.state_bytes() == 0);
      CHECK(sgd.state_bytes() == 0);
      // clip_grad_norm reports it, or throws with error_if_nonfinite.
      CHECK(!std::isfinite(clip_grad_norm(1.0, model)));
      try {
        clip_grad_norm({.max_norm = 1.0, .error_if_nonfinite = true}, model);
        FAIL("no error");
      } catch (const Error& e) {
        CHECK(e.component() == "clip_grad_norm");
        CHECK(e.argument() == "gradient of b");
      }
    }
  }
  SECTION("a finite gradient whose square overflows: Adam's update is finite") {
    for (const bool decoupled : {false, true}) {
      Linear<float> m({.d_in = 3, .d_out = 2, .seed = 1});
      Adam<float> adam({.lr = 1e-2, .decoupled_weight_decay = decoupled});
      for (int step = 0; step < 3; ++step) {
        m.visit_parameters([&](std::string_view, auto&, auto& g) { g.setConstant(3e19f); });
        adam.step(m);
        m.visit_parameters([&](std::string_view, auto& w, auto&) { CHECK(w.allFinite()); });
      }
      for (const auto& [path, entry] : adam.state())
        for (const auto& slot : entry.slots)
          CHECK(slot.allFinite());
    }
  }
  SECTION("step counts cannot overflow") {
    Adam<float> adam({.lr = 1e-2});
    Adam<float>::Entries entries;
    entries["w"] = {{Matrix<float>::Zero(3, 2), Matrix<float>::Zero(3, 2)},
                    std::numeric_limits<std::int64_t>::max()};
    CHECK_THROWS_AS(adam.set_state(entries), Error);
    entries["w"].steps = detail::kMaxOptimizerSteps;
    adam.set_state(entries);
    set_gradient(0.5f);
    CHECK_THROWS_AS(adam.step(model), Error);  // one more step would pass the bound
    CHECK(adam.steps("w") == detail::kMaxOptimizerSteps);
    CHECK(std::isfinite(inverse_sqrt(std::numeric_limits<std::int64_t>::max(), 10)));
  }
}

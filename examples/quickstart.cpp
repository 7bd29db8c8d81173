// The first program to read: causal multi-head attention over a batch of sequences.
#include <effattn/effattn.hpp>

#include <cstdio>

int main() {
  using namespace effattn;

  // Exact attention, tiled so it never holds an n×n matrix; causal is part of the type.
  using Attention = MultiHeadAttention<FullAttention<float>, Causal>;
  Attention attention({.d_model = 256, .heads = 4, .seed = 42});

  // Two sequences of 1000 tokens as one [2·1000 × 256] matrix; the second has 600 real tokens.
  const SequenceShape shape{.batch = 2, .seq = 1000, .lengths = {1000, 600}};
  Matrix<float> x(shape.tokens(), 256), y(shape.tokens(), 256);
  CounterRng(7).fill_normal(x);

  attention.forward(x, y, shape);
  std::printf("y: %lld × %lld, |y| = %.3f, scratch %.1f KiB\n", static_cast<long long>(y.rows()),
              static_cast<long long>(y.cols()), y.norm(), attention.scratch_peak_bytes() / 1024.0);

  // Training: keep what backward needs, then get dx and the parameter gradients.
  attention.set_training(true);
  attention.forward(x, y, shape);
  Matrix<float> dy = Matrix<float>::Ones(y.rows(), y.cols()), dx(x.rows(), x.cols());
  attention.backward(x, dy, dx, shape);
  attention.visit_parameters([](auto name, auto& w, auto& grad) {
    std::printf("%.*s: %lld×%lld, |grad| = %.3f\n", int(name.size()), name.data(),
                static_cast<long long>(w.rows()), static_cast<long long>(w.cols()), grad.norm());
  });
  return y.allFinite() && dx.allFinite() ? 0 : 1;
}

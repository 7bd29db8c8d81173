// A downstream program: builds against effattn::effattn and checks one attention call.
#include <effattn/effattn.hpp>

#include <cstdio>

int main() {
  using namespace effattn;
  MultiHeadAttention<FullAttention<float>, Causal> attention({.d_model = 16, .heads = 2});
  const SequenceShape shape{2, 10};
  Matrix<float> x(shape.tokens(), 16), y(shape.tokens(), 16);
  CounterRng(1).fill_normal(x);
  attention.forward(x, y, shape);
  if (!y.allFinite() || y.isZero()) {
    std::puts("consumer: attention output is wrong");
    return 1;
  }
  std::puts("consumer: ok");
  return 0;
}

// Feature maps: unbiased softmax-kernel estimates, the stabiliser's shift law, gradients.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "effattn/attention/favor/random_features.hpp"
#include "effattn/attention/feature_maps/hyperbolic_softmax_features.hpp"
#include "effattn/attention/feature_maps/positive_softmax_features.hpp"
#include "effattn/attention/feature_maps/relu_features.hpp"
#include "effattn/attention/feature_maps/trigonometric_features.hpp"
#include "reference.hpp"

using namespace effattn;
using reference::MatD;

namespace {

// φ(x) for one row with its own stabiliser shift, and that shift.
template <class Map, class S>
std::pair<std::vector<S>, S> features(const Matrix<S>& w, const Eigen::Matrix<S, 1, -1>& x) {
  const Index m = w.rows();
  const Eigen::Matrix<S, -1, 1> z = w * x.transpose();
  const S h = x.squaredNorm() / 2;
  const S shift = Map::log_max(z.data(), m, h);
  std::vector<S> phi(static_cast<std::size_t>(Map::width * m));
  Map::apply(z.data(), m, h, shift, phi.data());
  return {phi, shift};
}

template <class S>
double dot(const std::vector<S>& a, const std::vector<S>& b) {
  double sum = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    sum += double(a[i]) * double(b[i]);
  return sum;
}

}  // namespace

TEMPLATE_TEST_CASE("Softmax feature maps estimate exp(x·y) without bias, through the stabiliser",
                   "[feature_maps]", PositiveSoftmaxFeatures, HyperbolicSoftmaxFeatures,
                   TrigonometricFeatures) {
  using Map = TestType;
  const Index d = 8, m = 32;
  const int seeds = 2000;
  Eigen::RowVectorXd x(d), y(d);
  CounterRng(5).fill_normal(x, 0.2);
  CounterRng(6).fill_normal(y, 0.2);
  std::vector<double> estimates;
  for (int s = 0; s < seeds; ++s) {
    const auto w = draw_random_features<double>(m, d, FeatureDirections::iid, FeatureNorms::regular,
                                                CounterRng(s, 3));
    const auto [fx, sx] = features<Map>(w, Eigen::RowVectorXd(x));
    const auto [fy, sy] = features<Map>(w, Eigen::RowVectorXd(y));
    estimates.push_back(dot(fx, fy) * std::exp(sx + sy));  // undo the two shifts
  }
  double mean = 0, var = 0;
  for (const double e : estimates)
    mean += e / seeds;
  for (const double e : estimates)
    var += (e - mean) * (e - mean) / (seeds - 1);
  const double standard_error = std::sqrt(var / seeds);
  CAPTURE(mean, standard_error, std::exp(x.dot(y)));
  CHECK(std::abs(mean - std::exp(x.dot(y))) < 4 * standard_error);
  CHECK(standard_error < 0.05);  // the check above is not vacuous
}

TEMPLATE_TEST_CASE("Feature maps: shift law and gradients (finite differences, double)",
                   "[feature_maps]", PositiveSoftmaxFeatures, HyperbolicSoftmaxFeatures,
                   TrigonometricFeatures, ReluFeatures) {
  using Map = TestType;
  const Index m = 7, width = Map::width * m;
  Eigen::VectorXd z(m), g(width);
  CounterRng(11).fill_normal(z);
  CounterRng(12).fill_normal(g);
  double h = 0.8;
  const double shift = Map::log_max(z.data(), m, h) + 0.25;
  auto phi_of = [&](double s) {
    Eigen::VectorXd phi(width);
    Map::apply(z.data(), m, h, s, phi.data());
    return phi;
  };
  const Eigen::VectorXd phi = phi_of(shift);
  CHECK(phi.allFinite());
  // Shifting by 0.5 more divides exp-based features by e^0.5; other maps ignore the shift.
  const double factor =
      Map::log_max(z.data(), m, h) == 0 && !Map::estimates_softmax ? 1.0 : std::exp(-0.5);
  CHECK(reference::relative_error(phi_of(shift + 0.5), (factor * phi).eval()) < 1e-14);

  Eigen::VectorXd dz(m);
  const double dh = Map::backward(z.data(), m, h, phi.data(), g.data(), dz.data());
  auto loss = [&] { return g.dot(phi_of(shift)); };  // the shift is held constant
  CHECK(reference::gradient_error(dz, reference::numeric_gradient(loss, z)) < 1e-8);
  Eigen::Matrix<double, 1, 1> hv(h);
  const auto numeric_dh = reference::numeric_gradient(
      [&] {
        h = hv(0);
        return loss();
      },
      hv);
  CHECK(std::abs(dh - numeric_dh(0)) < 1e-8 * std::max(1.0, std::abs(dh)));
}

TEST_CASE("ReLU features are max(Wx, 0)/sqrt(m)", "[feature_maps]") {
  const double z[4] = {-1.0, 0.0, 2.0, 0.5};
  double phi[4];
  ReluFeatures::apply(z, 4, 10.0, 3.0, phi);
  CHECK(phi[0] == 0.0);
  CHECK(phi[1] == 0.0);
  CHECK(phi[2] == Approx(1.0));
  CHECK(phi[3] == Approx(0.25));
  CHECK(std::string(ReluFeatures::name) == "relu");
}

TEST_CASE("Positive features stay finite in float for inputs of norm 30", "[feature_maps]") {
  const Index d = 64, m = 256;
  const auto w = draw_random_features<float>(m, d, FeatureDirections::orthogonal,
                                             FeatureNorms::regular, CounterRng(1));
  for (const double norm : {1.0, 10.0, 30.0}) {
    Eigen::RowVectorXf x(d);
    CounterRng(2).fill_normal(x);
    x *= float(norm / x.norm() / std::pow(double(d), 0.25));  // as FAVOR+ scales q and k
    for (const bool hyperbolic : {false, true}) {
      const auto [phi, shift] = hyperbolic ? features<HyperbolicSoftmaxFeatures>(w, x)
                                           : features<PositiveSoftmaxFeatures>(w, x);
      const Eigen::Map<const Eigen::ArrayXf> values(phi.data(), Index(phi.size()));
      CAPTURE(norm, hyperbolic, shift);
      CHECK(values.allFinite());
      CHECK((values >= 0).all());
      // The largest feature of the row is exactly the stabiliser's 1 (times 1/√(width·m)).
      CHECK(values.maxCoeff() == Approx(1.0 / std::sqrt(double(phi.size()))).epsilon(1e-5));
    }
  }
}

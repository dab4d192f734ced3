// A bias policy of your own that learns: a per-head penalty on the log distance,
//   bias(h, i, j) = -slope_h * log(1 + |i - j|),
// trained with relbias's backward and optimiser. What makes a policy trainable (concepts.hpp):
//   is_learned = true, and parameters() as one flat Eigen map (const and non-const): the layout
//     that bias gradients, optimisers and parameter files share;
//   the chain rule, either accumulate_offset_gradient (shift-invariant policies: the kernel sums
//     dL/dbias along each diagonal i - j and calls it once per head) or
//     accumulate_gradient(h, i, j, d_bias, grad) (any policy: called per cell).
// The backward ADDS into bias_grad (one table often serves many layers): zero it every step.
//
// Checks: the policy's gradient against central finite differences, then a student learning a
// teacher's slopes from the teacher's outputs.
#include <relbias/relbias.hpp>

#include <cmath>
#include <cstdio>
#include <span>
#include <vector>

using relbias::index_t;

class log_distance_bias {
 public:
  using scalar_type = double;
  static constexpr bool is_learned = true;
  static constexpr bool is_shift_invariant = true;

  explicit log_distance_bias(std::vector<double> slopes) : slopes_(std::move(slopes)) {}

  index_t num_heads() const { return index_t(slopes_.size()); }
  double at_offset(index_t h, index_t delta) const { return -slopes_[std::size_t(h)] * feature(delta); }
  double operator()(index_t h, index_t i, index_t j) const { return at_offset(h, i - j); }

  Eigen::Map<relbias::param_vector<double>> parameters() { return {slopes_.data(), num_heads()}; }
  Eigen::Map<const relbias::param_vector<double>> parameters() const { return {slopes_.data(), num_heads()}; }

  /// d_bias[k] = dL/dbias summed over head h's cells with i - j == delta_lo + k;
  /// dbias/dslope_h = -log(1 + |delta|).
  void accumulate_offset_gradient(index_t h, index_t delta_lo, std::span<const double> d_bias, std::span<double> grad) const {
    for (std::size_t k = 0; k < d_bias.size(); ++k) grad[std::size_t(h)] -= d_bias[k] * feature(delta_lo + index_t(k));
  }

 private:
  static double feature(index_t delta) { return std::log1p(double(delta < 0 ? -delta : delta)); }
  std::vector<double> slopes_;
};
static_assert(relbias::offset_differentiable_bias<log_distance_bias>);

namespace {

const index_t seq = 32, heads = 2, dim = 8;
const relbias::attention_options<double> options{.mask = relbias::masking::causal};

struct batch {
  relbias::tensor<double> q{1, seq, heads, dim}, k{1, seq, heads, dim}, v{1, seq, heads, dim}, target;
};

/// Loss 0.5 * |O - target|^2 and its gradient with respect to the bias parameters.
double loss_and_gradient(const batch& data, const log_distance_bias& bias, std::vector<double>& bias_grad) {
  const auto forward = relbias::attention(data.q.view(), data.k.view(), data.v.view(), bias, options);
  relbias::tensor<double> d_out(1, seq, heads, dim), dq(1, seq, heads, dim), dk(1, seq, heads, dim), dv(1, seq, heads, dim);
  double loss = 0;
  for (index_t n = 0; n < d_out.size(); ++n) {
    d_out.data()[n] = forward.out.data()[n] - data.target.data()[n];
    loss += 0.5 * d_out.data()[n] * d_out.data()[n];
  }
  std::fill(bias_grad.begin(), bias_grad.end(), 0.0);  // attention_backward accumulates into it
  relbias::attention_backward(data.q.view(), data.k.view(), data.v.view(), forward.out.view(), d_out.view(), forward.lse,
                              bias, options, dq.view(), dk.view(), dv.view(), bias_grad);
  return loss;
}

}  // namespace

int main() {
  batch data;
  for (index_t n = 0; n < data.q.size(); ++n) {
    data.q.data()[n] = std::sin(0.9 * double(n));
    data.k.data()[n] = std::cos(0.4 * double(n));
    data.v.data()[n] = std::sin(0.17 * double(n) + 1.0);
  }
  const log_distance_bias teacher{{1.5, 0.25}};
  data.target = relbias::attention(data.q.view(), data.k.view(), data.v.view(), teacher, options).out;

  // 1. The gradient the kernel computes through our chain rule, against finite differences.
  log_distance_bias student{{0.5, 1.0}};
  std::vector<double> grad(2), scratch(2);
  loss_and_gradient(data, student, grad);
  double gradient_error = 0;
  for (index_t p = 0; p < 2; ++p) {
    const double step = 1e-6, saved = student.parameters()[p];
    student.parameters()[p] = saved + step;
    const double up = loss_and_gradient(data, student, scratch);
    student.parameters()[p] = saved - step;
    const double down = loss_and_gradient(data, student, scratch);
    student.parameters()[p] = saved;
    gradient_error = std::max(gradient_error, std::abs(grad[std::size_t(p)] - (up - down) / (2 * step)));
  }

  // 2. Training: the student recovers the teacher's slopes.
  relbias::adam<double> optimiser{0.05};
  const double first_loss = loss_and_gradient(data, student, grad);
  double loss = first_loss;
  for (int step = 0; step < 300; ++step) {
    loss = loss_and_gradient(data, student, grad);
    optimiser.step(student, grad);
  }
  const auto slopes = student.parameters();
  std::printf("gradient vs finite differences: max |difference| = %.3g\n"
              "loss %.3g -> %.3g after 300 Adam steps; slopes (%.4f, %.4f), teacher's (1.5, 0.25)\n",
              gradient_error, first_loss, loss, slopes[0], slopes[1]);
  const bool learned = std::abs(slopes[0] - 1.5) < 1e-2 && std::abs(slopes[1] - 0.25) < 1e-2;
  return gradient_error < 1e-7 && learned ? 0 : 1;
}

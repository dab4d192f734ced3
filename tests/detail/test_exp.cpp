// packet_exp (detail/exp.hpp), the softmax's exp: against exp in long double over the whole
// float range, the limits (0 below FLT_MIN's logarithm, +inf past FLT_MAX's), exp(0) = 1 exactly
// (the row maximum's weight), and NaN / infinities; float (AVX-512: vscalefps; elsewhere pexp) and
// double (pexp).
#include "catch.hpp"

#include <relbias/detail/exp.hpp>

#include <cmath>
#include <limits>
#include <vector>

namespace {

namespace ei = Eigen::internal;

template <class S>
using packet = typename ei::packet_traits<S>::type;

template <class S>
constexpr int lanes = ei::packet_traits<S>::size;

/// packet_exp of each of xs (a whole number of packets).
template <class S>
std::vector<S> packet_exps(const std::vector<S>& xs) {
  std::vector<S> out(xs.size());
  for (std::size_t i = 0; i + lanes<S> <= xs.size(); i += lanes<S>)
    ei::pstoreu(out.data() + i, relbias::detail::packet_exp<S>(ei::ploadu<packet<S>>(xs.data() + i)));
  return out;
}

/// xs from lo to hi in relative steps of `step`, padded to whole packets with hi.
template <class S>
std::vector<S> grid(double lo, double hi, double step) {
  std::vector<S> xs;
  for (double x = lo; x <= hi; x += step * std::max(1.0, std::abs(x))) xs.push_back(S(x));
  while (xs.size() % lanes<S> != 0) xs.push_back(S(hi));
  return xs;
}

}  // namespace

TEMPLATE_TEST_CASE("packet_exp: within a few ulp of exp over the normal range", "[exp]", float, double) {
  using S = TestType;
  // Results from FLT_MIN (e^-87.34) up to e^88.3 (Eigen's AVX-512 pexp clamps at 88.38: the
  // fallback must pass too); double over the same arguments. The kernels pass arguments <= 0.
  const auto xs = grid<S>(-87.3, 88.3, 1e-5);
  const auto got = packet_exps(xs);
  double worst = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const long double expected = std::exp(static_cast<long double>(xs[i]));
    const long double ulp = std::nextafter(static_cast<S>(expected), std::numeric_limits<S>::infinity()) - static_cast<S>(expected);
    worst = std::max(worst, double(std::abs(static_cast<long double>(got[i]) - expected) / ulp));
  }
  INFO("worst error " << worst << " ulp over " << xs.size() << " arguments");
  CHECK(worst <= 5.0);  // float on AVX-512: 4.6 at most (near 88)
}

TEMPLATE_TEST_CASE("packet_exp: 1 at 0, 0 far below, +inf far above, NaN stays NaN", "[exp]", float, double) {
  using S = TestType;
  constexpr S inf = std::numeric_limits<S>::infinity();
  std::vector<S> xs{S(0), -inf, inf, std::numeric_limits<S>::quiet_NaN(), S(-1e30), S(1e30), S(-0.0), S(1)};
  if (std::is_same_v<S, float>) xs.insert(xs.end(), {S(-87.34), S(-88), S(-100), S(89)});
  while (xs.size() % lanes<S> != 0) xs.push_back(S(0));
  const auto got = packet_exps(xs);
  CHECK(got[0] == S(1));
  // Eigen's pexp (double) leaves a subnormal far below; the AVX-512 float path gives exactly 0.
  CHECK((got[1] >= S(0) && got[1] < std::numeric_limits<S>::min()));
  CHECK(got[2] == inf);
  CHECK(std::isnan(got[3]));
  CHECK((got[4] >= S(0) && got[4] < std::numeric_limits<S>::min()));
  CHECK(got[5] == inf);
  CHECK(got[6] == S(1));
  CHECK(std::abs(got[7] - S(2.718281828459045)) <= S(4) * std::numeric_limits<S>::epsilon());
  if (std::is_same_v<S, float>) {  // below ln(FLT_MIN): below FLT_MIN; above ln(FLT_MAX): +inf
    const std::size_t far_below[] = {8, 9, 10};
    for (const std::size_t i : far_below) CHECK((got[i] >= S(0) && got[i] < std::numeric_limits<S>::min()));
    CHECK(got[11] == inf);
#if defined(EIGEN_VECTORIZE_AVX512)
    const std::size_t zeros[] = {1, 4, 8, 9, 10};
    for (const std::size_t i : zeros) CHECK(got[i] == S(0));  // exactly 0, never a subnormal
#endif
  }
}

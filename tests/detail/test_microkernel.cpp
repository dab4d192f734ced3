// The register-blocked product and the pack routines (detail/microkernel.hpp) against plain
// loops in long double: every block edge (rows around block_rows, columns around one and two
// packets, the scalar tail), transposed A, accumulate and alpha, float and double.
#include "catch.hpp"

#include <relbias/detail/microkernel.hpp>
#include <relbias/detail/random.hpp>

#include <cmath>
#include <cstring>
#include <vector>

using relbias::index_t;
namespace detail = relbias::detail;

namespace {

template <class S>
std::vector<S> random_values(index_t count, std::uint64_t seed) {
  detail::random_stream rng(seed);
  std::vector<S> values(static_cast<std::size_t>(count));
  for (S& x : values) x = S(rng.uniform(-1.0, 1.0));
  return values;
}

/// Worst |got - expected| / max(|expected|, 1) of C = alpha A B (+ C0) computed by
/// block_product, with A read through (row_stride, depth_stride) from a buffer holding it either
/// row-major or transposed, B and C with padded leading dimensions.
template <class S>
double product_error(index_t m, index_t n, index_t depth, bool a_transposed, bool accumulate, S alpha) {
  const index_t ldb = n + 3, ldc = n + 5;
  const auto a = random_values<S>(std::max<index_t>(m * depth, 1), 1);
  const auto b = random_values<S>(std::max<index_t>(depth * ldb, 1), 2);
  const auto c0 = random_values<S>(m * ldc, 3);
  const detail::strided_operand<S> a_view = a_transposed ? detail::strided_operand<S>{a.data(), 1, m}
                                                         : detail::strided_operand<S>{a.data(), depth, 1};
  std::vector<S> c = c0;
  detail::block_product<S>(m, n, depth, a_view, {b.data(), ldb}, {c.data(), ldc}, alpha, accumulate);
  double worst = 0;
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j) {
      long double sum = 0;
      for (index_t k = 0; k < depth; ++k) sum += (long double)*a_view.at(i, k) * b[std::size_t(k * ldb + j)];
      const long double expected = alpha * sum + (accumulate ? c0[std::size_t(i * ldc + j)] : 0);
      worst = std::max(worst, double(std::abs(c[std::size_t(i * ldc + j)] - expected) / std::max(std::abs(expected), 1.0L)));
    }
  for (index_t i = 0; i < m; ++i)  // the padding of C is never written
    for (index_t j = n; j < ldc; ++j)
      if (c[std::size_t(i * ldc + j)] != c0[std::size_t(i * ldc + j)]) return INFINITY;
  return worst;
}

}  // namespace

TEMPLATE_TEST_CASE("block_product: every block edge against a plain product", "[microkernel]", float, double) {
  using S = TestType;
  const index_t lanes = detail::lanes_of<S>, rows = detail::block_rows;
  const double eps = std::numeric_limits<S>::epsilon();
  for (const index_t m : {index_t(1), rows - 1, rows, rows + 1, 2 * rows + 3})
    // lanes / 2, lanes / 2 + lanes / 4 + 1 and lanes - 1 end in half packets (a half, a quarter) and scalars
    for (const index_t n : {index_t(1), lanes / 2, lanes / 2 + lanes / 4 + 1, lanes - 1, lanes, lanes + 1, 2 * lanes, 2 * lanes + 1,
                            4 * lanes + lanes / 2 + 1})
      for (const index_t depth : {index_t(0), index_t(1), index_t(64)})
        for (const bool transposed : {false, true})
          for (const bool accumulate : {false, true}) {
            if (n < 1) continue;
            INFO("m " << m << " n " << n << " depth " << depth << " transposed " << transposed << " accumulate " << accumulate);
            CHECK(product_error<S>(m, n, depth, transposed, accumulate, S(0.375)) <= 4 * double(depth + 2) * eps);
          }
}

TEST_CASE("block_product: a row's values do not depend on the block it falls in", "[microkernel]") {
  // The determinism tests need this: a query row computed in a full block of rows or alone
  // (a tile's last rows) gives the same bits.
  const index_t m = detail::block_rows + 1, n = 3 * detail::lanes_of<float> + 1, depth = 37;
  const auto a = random_values<float>(m * depth, 4);
  const auto b = random_values<float>(depth * n, 5);
  std::vector<float> together(std::size_t(m * n)), alone(std::size_t(m * n));
  detail::block_product<float>(m, n, depth, {a.data(), depth, 1}, {b.data(), n}, {together.data(), n}, 0.125f, false);
  for (index_t i = 0; i < m; ++i)
    detail::block_product<float>(1, n, depth, {a.data() + i * depth, depth, 1}, {b.data(), n}, {alone.data() + i * n, n}, 0.125f,
                                 false);
  CHECK(std::memcmp(together.data(), alone.data(), together.size() * sizeof(float)) == 0);
}

TEST_CASE("block_product: NaN and infinity in an operand reach exactly the outputs they touch", "[microkernel]") {
  const index_t m = detail::block_rows + 2, n = 2 * detail::lanes_of<float> + 3, depth = 5;
  std::vector<float> a(std::size_t(m * depth), 1.0f), b(std::size_t(depth * n), 1.0f), c(std::size_t(m * n), 0.0f);
  a[std::size_t(1 * depth + 2)] = NAN;                                   // row 1
  b[std::size_t(3 * n + n - 1)] = std::numeric_limits<float>::infinity();  // last column (the scalar tail)
  detail::block_product<float>(m, n, depth, {a.data(), depth, 1}, {b.data(), n}, {c.data(), n}, 1.0f, false);
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j) {
      const float x = c[std::size_t(i * n + j)];
      if (i == 1) CHECK(std::isnan(x));
      else if (j == n - 1) CHECK(x == std::numeric_limits<float>::infinity());
      else CHECK(x == float(depth));
    }
}

/// pack_transposed and pack_rows of a (count, dim) tile stored as Source, checked element by element.
template <class Source>
void check_packing(index_t count, index_t dim, index_t stride, index_t ld) {
  const auto values = random_values<double>(count * stride, 6);
  const std::vector<Source> rows(values.begin(), values.end());
  const index_t ld_rows = dim + 3;  // pack_rows with a leading dimension (the padded tiles) and without
  std::vector<float> transposed(std::size_t(dim * ld), -7.0f), packed(std::size_t(count * dim)),
      padded(std::size_t(count * ld_rows), -7.0f);
  detail::pack_transposed(rows.data(), stride, count, dim, transposed.data(), ld);
  detail::pack_rows(rows.data(), stride, count, dim, packed.data());
  detail::pack_rows(rows.data(), stride, count, dim, padded.data(), ld_rows);
  for (index_t c = 0; c < count; ++c)
    for (index_t d = 0; d < dim; ++d) {
      const float expected = float(rows[std::size_t(c * stride + d)]);  // widened (here narrowed) element by element
      CHECK(transposed[std::size_t(d * ld + c)] == expected);
      CHECK(packed[std::size_t(c * dim + d)] == expected);
      CHECK(padded[std::size_t(c * ld_rows + d)] == expected);
    }
  for (index_t c = 0; c < count; ++c) CHECK(padded[std::size_t(c * ld_rows + dim)] == -7.0f);  // the padding untouched
  for (index_t d = 0; d < dim; ++d) CHECK(transposed[std::size_t(d * ld + ld - 1)] == -7.0f);  // columns past count untouched
}

TEST_CASE("pack_transposed and pack_rows copy a strided tile into the micro-kernel's layouts", "[microkernel]") {
  check_packing<double>(19, 5, 11, 32);  // narrowed element by element
  // float: whole register-transposed blocks, then dims and keys past the last block (AVX-512: 16)
  for (const index_t count : {3, 16, 37})
    for (const index_t dim : {5, 16, 35}) check_packing<float>(count, dim, dim + 6, 48);
  // Whole lines of 64 bytes, an odd number of them (rows spread over all L1 sets).
  CHECK(detail::padded_to_line<float>(16) == 16);
  CHECK(detail::padded_to_line<float>(17) == 48);
  CHECK(detail::padded_to_line<float>(64) == 80);
  CHECK(detail::padded_to_line<float>(256) == 272);
  CHECK(detail::padded_to_line<double>(8) == 8);
  CHECK(detail::padded_to_line<double>(9) == 24);
}

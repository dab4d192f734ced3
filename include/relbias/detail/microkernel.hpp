#pragma once
// The register-blocked product behind every tile product of the fused kernels (BLIS's
// micro-kernel design, Van Zee & van de Geijn 2015; written with Eigen's packet primitives so
// that one code path serves AVX-512, AVX2, SSE, NEON and plain scalars):
//
//   C (m, n)  =  alpha A (m, depth) B (depth, n)   [+ C]
//
// B is read in rows of packets (row k: depth step k, n contiguous values), A one element at a
// time and broadcast, so A may be any strided view: a row-major tile (Q, dS) or a transposed one
// (P^T, dS^T, read from the same row-major memory). An MR x NP block of C stays in registers for
// the whole depth: per depth step, NP packet loads of B and MR broadcasts of A feed MR * NP FMAs.
// AVX-512 (32 registers): 8 x 2 packets = 16 accumulators; 16-register targets: 4 x 2.
// Accumulators are summed in depth order and written once, so an element's value depends only on
// its operands and its column's place in C (packet lanes, half packets or the scalar tail), never on which
// thread computes it or at which address: the determinism tests rely on it.
//
// The pack routines copy K and V tiles into the layouts the blocks read (K^T for the score
// products, V contiguous for P V), converting each element with widen<S>(): the storage type
// may be narrower than the compute type S (bf16 / f16 caches).

#include "relbias/detail/eigen.hpp"
#include "relbias/offset.hpp"

#include <algorithm>
#include <type_traits>

namespace relbias::detail {

template <class S>
using packet_of = typename Eigen::internal::packet_traits<S>::type;

template <class S>
inline constexpr index_t lanes_of = Eigen::internal::packet_traits<S>::size;

/// Block height in rows of C: half the vector registers hold accumulators (MR x 2 packets).
inline constexpr int block_rows = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 4;

/// A (rows, depth) operand: element (i, k) at data[i * row_stride + k * depth_stride].
template <class S>
struct strided_operand {
  const S* data;
  index_t row_stride, depth_stride;

  const S* at(index_t i, index_t k) const noexcept { return data + i * row_stride + k * depth_stride; }
};

/// A row-major (rows, cols) matrix with leading dimension ld (B and C).
template <class T>
struct row_block {
  T* data;
  index_t ld;

  T* at(index_t i, index_t j) const noexcept { return data + i * ld + j; }
};

/// The MR x NP-packet block of C at (i, j): the hot loop. Always inlined: called out of line,
/// GCC zeroed and stored the 16 accumulators through the stack around the depth loop on every
/// call, a cost the depth-64 score products (512 FMA cycles a block) felt: inlined, the fp32
/// forward and backward ran 2-3 % faster (docs/kernels.md, "fp32 on Intel").
template <int MR, int NP, class S, class packet = packet_of<S>>
EIGEN_ALWAYS_INLINE void product_block(strided_operand<S> a, row_block<const S> b, index_t depth, row_block<S> c, index_t i, index_t j,
                          S alpha, bool accumulate) {
  namespace ei = Eigen::internal;
  constexpr index_t lanes = ei::unpacket_traits<packet>::size;
  packet acc[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = ei::pset1<packet>(S(0));
  const S* a_row = a.at(i, 0);
  const S* b_row = b.at(0, j);
  for (index_t k = 0; k < depth; ++k, a_row += a.depth_stride, b_row += b.ld) {
    packet b_k[NP];
    for (int p = 0; p < NP; ++p) b_k[p] = ei::ploadu<packet>(b_row + p * lanes);
    for (int r = 0; r < MR; ++r) {
      const packet a_rk = ei::pset1<packet>(a_row[r * a.row_stride]);
      for (int p = 0; p < NP; ++p) acc[r][p] = ei::pmadd(a_rk, b_k[p], acc[r][p]);
    }
  }
  const packet alpha_p = ei::pset1<packet>(alpha);
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) {
      S* out = c.at(i + r, j + p * lanes);
      ei::pstoreu(out, accumulate ? ei::pmadd(alpha_p, acc[r][p], ei::ploadu<packet>(out)) : ei::pmul(alpha_p, acc[r][p]));
    }
}

// GCC warns that a vector type's attributes are ignored as a template argument (harmless: the
// half packet names the same type Eigen's own kernels use; see transpose_block below).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
/// Columns [j, n) of rows [i, i + MR), fewer than a packet of P: blocks of P's half packet (on
/// AVX-512, 8 then 4 floats) while they fit, then scalar columns. Head dimensions below a packet
/// (8 floats: d_model 32 over 4 heads) made P V and dQ scalar loops: 60 % of a training step.
template <int MR, class P, class S>
inline void narrow_columns(strided_operand<S> a, row_block<const S> b, index_t depth, row_block<S> c, index_t i, index_t j,
                           index_t n, S alpha, bool accumulate) {
  namespace ei = Eigen::internal;
  using half = typename ei::unpacket_traits<P>::half;
  constexpr index_t width = ei::unpacket_traits<half>::size;
  if constexpr (width > 1 && width < ei::unpacket_traits<P>::size) {
    for (; j + width <= n; j += width) product_block<MR, 1, S, half>(a, b, depth, c, i, j, alpha, accumulate);
    narrow_columns<MR, half>(a, b, depth, c, i, j, n, alpha, accumulate);
  } else {
    for (; j < n; ++j)
      for (int r = 0; r < MR; ++r) {
        S sum(0);
        for (index_t k = 0; k < depth; ++k) sum += *a.at(i + r, k) * *b.at(k, j);
        S* out = c.at(i + r, j);
        *out = accumulate ? *out + alpha * sum : alpha * sum;
      }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// Columns [0, n) of rows [i, i + MR): blocks of two packets, then one, then narrower ones.
template <int MR, class S>
inline void product_rows(strided_operand<S> a, row_block<const S> b, index_t depth, row_block<S> c, index_t i, index_t n,
                         S alpha, bool accumulate) {
  constexpr index_t lanes = lanes_of<S>;
  index_t j = 0;
  for (; j + 2 * lanes <= n; j += 2 * lanes) product_block<MR, 2>(a, b, depth, c, i, j, alpha, accumulate);
  for (; j + lanes <= n; j += lanes) product_block<MR, 1>(a, b, depth, c, i, j, alpha, accumulate);
  narrow_columns<MR, packet_of<S>>(a, b, depth, c, i, j, n, alpha, accumulate);
}

/// C (m, n) = alpha A (m, depth) B (depth, n), plus C when accumulate.
template <class S>
void block_product(index_t m, index_t n, index_t depth, strided_operand<S> a, row_block<const S> b, row_block<S> c, S alpha,
                   bool accumulate) {
  constexpr index_t panel = 2 * lanes_of<S>;
  const index_t full_m = m / block_rows * block_rows, full_n = n / panel * panel;
  // Panel by panel: one panel of B (depth x 2 packets) stays in L1 while every row block of A
  // passes it, instead of all of B streaming from L2 for each row block.
  for (index_t j = 0; j < full_n; j += panel)
    for (index_t i = 0; i < full_m; i += block_rows) product_block<block_rows, 2>(a, b, depth, c, i, j, alpha, accumulate);
  const row_block<const S> b_rest{b.data + full_n, b.ld};
  const row_block<S> c_rest{c.data + full_n, c.ld};
  if (full_n < n)
    for (index_t i = 0; i < full_m; i += block_rows) product_rows<block_rows>(a, b_rest, depth, c_rest, i, n - full_n, alpha, accumulate);
  for (index_t i = full_m; i < m; ++i) product_rows<1>(a, b, depth, c, i, n, alpha, accumulate);
}

/// The compute type's value of a stored element (float and double: the element itself).
template <class S, class T>
inline S widen(const T& x) noexcept {
  return static_cast<S>(x);
}

// GCC warns that a vector type's attributes are ignored as a template argument of PacketBlock
// (harmless: Eigen's own kernels instantiate the same block; its headers are system headers).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
/// One lanes x lanes block transposed in registers (Eigen's ptranspose): `lanes` rows of `rows`
/// (a packet of dims each) become `lanes` rows of out (a packet of keys each).
template <class S>
inline void transpose_block(const S* rows, index_t row_stride, S* out, index_t ld) {
  namespace ei = Eigen::internal;
  using packet = packet_of<S>;
  constexpr int lanes = int(lanes_of<S>);
  ei::PacketBlock<packet, lanes> block;
  for (int c = 0; c < lanes; ++c) block.packet[c] = ei::ploadu<packet>(rows + c * row_stride);
  ei::ptranspose(block);
  for (int d = 0; d < lanes; ++d) ei::pstoreu(out + d * ld, block.packet[d]);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// out (dim, count) row-major with leading dimension ld = rows [0, count) of `rows` (count, dim)
/// transposed: the B operand of a score product (Q K^T reads K^T). Same-type tiles go through
/// register transposes of lanes x lanes blocks (scalar copies cost a tenth of the forward's time
/// at d = 64); the edges, and storage narrower than S, element by element.
template <class S, class T>
void pack_transposed(const T* rows, index_t row_stride, index_t count, index_t dim, S* out, index_t ld) {
  constexpr index_t lanes = std::is_same_v<S, T> ? lanes_of<S> : 1;
  const index_t full_count = lanes > 1 ? count / lanes * lanes : 0, full_dim = lanes > 1 ? dim / lanes * lanes : 0;
  if constexpr (lanes > 1)
    for (index_t c0 = 0; c0 < full_count; c0 += lanes)
      for (index_t d0 = 0; d0 < full_dim; d0 += lanes) transpose_block(rows + c0 * row_stride + d0, row_stride, out + d0 * ld + c0, ld);
  for (index_t d = 0; d < dim; ++d)  // what the blocks left: dims past full_dim for every key, keys past full_count
    for (index_t c = d < full_dim ? full_count : 0; c < count; ++c) out[d * ld + c] = widen<S>(rows[c * row_stride + d]);
}

/// out (count, dim) with leading dimension ld (default: contiguous) = rows [0, count) of `rows`
/// (count, dim): the B operand of P V.
template <class S, class T>
void pack_rows(const T* rows, index_t row_stride, index_t count, index_t dim, S* out, index_t ld = 0) {
  if (ld == 0) ld = dim;
  for (index_t c = 0; c < count; ++c)
    for (index_t d = 0; d < dim; ++d) out[c * ld + d] = widen<S>(rows[c * row_stride + d]);
}

/// Asks the caches for rows [0, count) of a (count, dim) operand, one request per 64-byte line:
/// the next key tile, fetched while the current one computes (packing it otherwise waits on memory).
template <class T>
void prefetch_rows(const T* rows, index_t row_stride, index_t count, index_t dim) {
  constexpr index_t per_line = index_t(64 / sizeof(T));
  for (index_t c = 0; c < count; ++c)
    for (index_t d = 0; d < dim; d += per_line) Eigen::internal::prefetch(rows + c * row_stride + d);
}

/// One line at the start of each 4 KiB page that rows [0, count) of `stride` elements cross:
/// a run of keys read after a jump (a paged cache's next block) has its pages' streams started
/// ahead, where a prefetch of its first rows alone left each further page to a demand load.
template <class T>
void prefetch_pages(const T* first, index_t stride, index_t count) {
  const index_t row_bytes = stride * index_t(sizeof(T)), per_page = std::max<index_t>(1, 4096 / row_bytes);
  for (index_t r = 0; r < count; r += per_page) Eigen::internal::prefetch(first + r * stride);
}

/// The leading dimension of a packed tile of rows of n values of S: n rounded up to a whole and
/// odd number of 64-byte lines. A power-of-two row (256 floats: 1 KiB) puts the rows of a
/// micro-kernel panel into a quarter of the L1 sets, where the 64 rows of a K^T panel (128
/// lines) do not fit: each row block re-read them from L2 (rows of 64 floats: half the sets,
/// too few for a V panel's 256 rows). An odd number of lines spreads consecutive rows over all sets.
template <class S>
constexpr index_t padded_to_line(index_t n) {
  constexpr index_t per_line = index_t(64 / sizeof(S));
  const index_t lines = (n + per_line - 1) / per_line;
  return (lines % 2 == 0 ? lines + 1 : lines) * per_line;
}

}  // namespace relbias::detail

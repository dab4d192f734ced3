#pragma once
// The bf16 forward on AMX (attention_options::compute = compute_precision::bf16, k and v in
// Eigen::bfloat16, q in bfloat16 or float): Q K^T and P V as bf16 tile products with float
// accumulation (detail/amx.hpp), everything else in float as in attention.hpp:
//
//   S = Q K^T (bf16 x bf16 -> float),  scale, bias, masks, online softmax, lse in float,
//   O += bf16(P) V (float accumulator),  P = exp(S - reference max) rounded to nearest bf16.
//
// As FlashAttention does on GPUs; the row sum of the softmax is the float sum of the unrounded
// P, so O's error from rounding P is at most 2^-8 max |v| (docs/storage.md gives the bound).
// A float q is rounded to bf16 first (2^-8 relative per element, in the same bound).
//
// K and V are packed once per call, for each (sequence, key/value head), into the tile layouts
// (amx.hpp): keys in 16-key blocks of (D/2) pair rows, values in 32-key chunks of 16 pair rows,
// zero-padded to 32 keys, D to a multiple of 32 and Dv of 16, so that no tile ever reads past a
// sequence or needs a second configuration. A work item is (sequence, query head, 256 query rows),
// eight strips of 32 rows, and walks the key blocks of 256 keys its rows see, from the block of
// its diagonal on: per strip and block, one call computes the scores into an L1 buffer, one row
// pass in registers adds scale and bias and takes the exponentials (against the row's reference
// maximum), their sum and the bf16 P (bf16_softmax_row says when it takes a second), and one
// call adds P V to the strip's float accumulator. Each item's arithmetic depends on the item
// alone: same inputs and CPU, same bits, whatever the thread count.

#include "relbias/attention.hpp"
#include "relbias/detail/amx.hpp"
#include "relbias/detail/storage.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <span>
#include <type_traits>
#include <vector>

namespace relbias::detail {

// Query rows per work item: eight strips share each key block of K and V (from L2 after the first
// strip: a block's K and V and a strip's scores exceed L1); 256 rows ran about 5 % faster than 128
// at L = 4096, 512 no faster again with a bias, and 256 keeps more items for the threads.
inline constexpr index_t bf16_tile_rows = 256;
inline constexpr index_t bf16_strip_rows = 32;  // rows per tile product (two 16-row A tiles)
inline constexpr index_t bf16_key_block = 256;  // keys per block: a strip's float scores (32 KiB) and bf16 P
inline constexpr index_t bf16_key_chunk = 32;   // keys per tile step (two 16-key B tiles; the depth of P V)

// Row strides of the scores and P buffers: one cache line past the block, so that the 32 rows
// of a strip do not map to the same few L1 sets (1 KiB apart, every fourth row would share a
// set); P's rows stay on 64-byte boundaries (tile loads).
inline constexpr index_t bf16_score_stride = bf16_key_block + 16, bf16_p_stride = bf16_key_block + 32;

constexpr index_t round_up(index_t n, index_t multiple) { return (n + multiple - 1) / multiple * multiple; }

/// Allocates on 64-byte boundaries, whatever Eigen's alignment in this build: a tile row that
/// straddles two cache lines makes a tile load about 10x slower (measured on Sapphire Rapids).
template <class T>
struct line_allocator {
  using value_type = T;
  line_allocator() = default;
  template <class U>
  line_allocator(const line_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{64}); }
  friend bool operator==(const line_allocator&, const line_allocator&) noexcept { return true; }
};

template <class T>
using line_vector = std::vector<T, line_allocator<T>>;

template <class T>
std::uint16_t bf16_bits(T x) noexcept {
  if constexpr (std::same_as<T, Eigen::bfloat16>) return Eigen::numext::bit_cast<std::uint16_t>(x);
  else return Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(x));  // round to nearest even
}

/// Everything one bf16 forward call shares across work items.
template <class Q>
struct bf16_forward_problem {
  tensor_view<const Q> q;
  tensor_view<const Eigen::bfloat16> k, v;
  tensor_view<float> o;
  std::span<float> lse;
  float scale;
  index_t group;  // query heads per key/value head

  index_t lse_index(index_t b, index_t h, index_t row) const { return (b * q.heads + h) * q.seq + row; }
};

/// K and V of every (sequence, key/value head) of a call in the tile layouts.
struct bf16_packed_kv {
  index_t dim_pad = 0, dim_v_pad = 0;  // D rounded up to 32, Dv to 16
  std::vector<index_t> first_key;      // per (sequence, key/value head): its first packed key
  line_vector<std::uint16_t> keys, values;  // (packed keys, dim_pad), (packed keys, dim_v_pad)

  const std::uint16_t* keys_of(std::size_t sequence, index_t heads, index_t head) const {
    return keys.data() + first_key[sequence * std::size_t(heads) + std::size_t(head)] * dim_pad;
  }
  const std::uint16_t* values_of(std::size_t sequence, index_t heads, index_t head) const {
    return values.data() + first_key[sequence * std::size_t(heads) + std::size_t(head)] * dim_v_pad;
  }
};

/// count key rows (seq_stride apart, dim each) into `out` (zeros, 16 * dim_pad per 16 keys): key
/// n of a 16-key block, dimensions 2kk and 2kk + 1 (one 32-bit pair), go to pair row kk, lane n.
/// AVX-512 (amx::pack_key_block): it runs on the AMX paths only.
inline void pack_keys(const Eigen::bfloat16* rows, index_t seq_stride, index_t count, index_t dim, index_t dim_pad, std::uint16_t* out) {
  const auto* bits = reinterpret_cast<const std::uint16_t*>(rows);  // Eigen::bfloat16 is its 16 bits (standard layout)
  for (index_t r = 0; r < count; r += 16) {
    std::uint16_t* block = out + r * dim_pad;
    amx::pack_key_block(bits + r * seq_stride, seq_stride, count - r, dim / 2, block);
    if (dim % 2)  // the last dimension alone in its pair
      for (index_t n = r; n < std::min(count, r + 16); ++n) block[(dim / 2) * 32 + (n - r) * 2] = bits[n * seq_stride + dim - 1];
  }
}

/// count value rows into `out` (zeros, 32 * dim_v_pad per 32 keys; dim_v_pad a multiple of 16):
/// keys 2m and 2m + 1 of a 32-key chunk become pair row m, their column n the pair
/// (v[2m][n], v[2m + 1][n]). AVX-512 (amx::pack_value_pair): on the AMX paths only.
inline void pack_values(const Eigen::bfloat16* rows, index_t seq_stride, index_t count, index_t dim_v, index_t dim_v_pad,
                        std::uint16_t* out) {
  RELBIAS_ASSERT(dim_v_pad % 16 == 0 && dim_v <= dim_v_pad);
  const auto* bits = reinterpret_cast<const std::uint16_t*>(rows);
  for (index_t r = 0; r < count; r += 2) {
    const std::uint16_t* even = bits + r * seq_stride;
    amx::pack_value_pair(even, r + 1 < count ? even + seq_stride : nullptr, dim_v,
                         out + (r / 32) * 32 * dim_v_pad + ((r % 32) / 2) * 2 * dim_v_pad);
  }
}

/// Packs every sequence's keys and values, one (sequence, key/value head) pair per work item.
template <class Q>
bf16_packed_kv pack_kv(const bf16_forward_problem<Q>& pb, const batch_layout& layout, int threads) {
  bf16_packed_kv packed;
  packed.dim_pad = round_up(pb.k.dim, 32);
  packed.dim_v_pad = round_up(pb.v.dim, 16);
  const index_t heads = pb.k.heads;
  index_t total = 0;
  for (const sequence& s : layout.sequences)
    for (index_t h = 0; h < heads; ++h) {
      packed.first_key.push_back(total);
      total += round_up(s.k_length, bf16_key_chunk);
    }
  packed.keys.assign(std::size_t(total * packed.dim_pad), 0);
  packed.values.assign(std::size_t(total * packed.dim_v_pad), 0);
  parallel_items(index_t(layout.sequences.size()) * heads, threads, [] { return 0; }, [&](index_t item, int) {
    const sequence& s = layout.sequences[std::size_t(item / heads)];
    const index_t h = item % heads, first = packed.first_key[std::size_t(item)];
    pack_keys(pb.k.row(s.batch, s.k_begin, h), pb.k.seq_stride, s.k_length, pb.k.dim, packed.dim_pad,
              packed.keys.data() + first * packed.dim_pad);
    pack_values(pb.v.row(s.batch, s.k_begin, h), pb.v.seq_stride, s.k_length, pb.v.dim, packed.dim_v_pad,
                packed.values.data() + first * packed.dim_v_pad);
  });
  return packed;
}

struct bf16_forward_scratch {
  index_t dim_v_pad;
  line_vector<std::uint16_t> q;    // (bf16_tile_rows, dim_pad): the item's queries in bf16
  line_vector<float> scores;       // (bf16_strip_rows, bf16_score_stride)
  line_vector<std::uint16_t> p;    // (bf16_strip_rows, bf16_p_stride): P in bf16
  line_vector<float> accumulator;  // (bf16_tile_rows, dim_v_pad)
  Eigen::ArrayXf row_max, row_sum;  // (bf16_tile_rows)

  Eigen::Map<Eigen::RowVectorXf> accumulator_row(index_t r) { return {accumulator.data() + r * dim_v_pad, dim_v_pad}; }
};

/// The largest sum of one block's exponentials against the row's reference maximum that is
/// kept: every P is then at most 2^16 and the float sums stay far from overflow. A larger sum
/// (or NaN, +inf) redoes the block against its own maximum, so the accumulator is rescaled only
/// when the maximum rises that much: always past 16 ln 2 above the reference, never while every
/// score of a 256-key block stays within 8 ln 2 of it.
inline constexpr float bf16_headroom = 65536.0f;

/// One row of a strip over one key block: scale and bias on the float scores (x, relative to
/// the block's first key j0), one step of the online softmax, bf16 P over the columns `chunks`
/// (zero where the row sees no key). Once the row has a finite reference maximum, one pass in
/// registers takes the exponentials against it, their sum and P; a block whose sum exceeds
/// bf16_headroom, and a row's first block, take the maximum first (a second pass).
/// Rows whose scores hold no finite maximum (every key hidden by the bias, +inf, NaN) and rows
/// already NaN take online_softmax_row, the float kernel's rules. Always inlined: GCC 12 kept it
/// a call per row and block for the policies with a plan (not for no bias), and ALiBi and T5
/// then ran 6-7 % slower than no bias instead of 0-3 % (least CPU time of 15 runs, under load).
template <class Plan, class AccumulatorRow>
[[gnu::always_inline]] inline void bf16_softmax_row(const Plan& plan, float scale, index_t h, index_t i, index_t j0, index_range visible, index_range chunks,
                      float* x, std::uint16_t* p, float& row_max, float& row_sum, AccumulatorRow&& accumulator_row) {
  if (visible.empty()) {
    std::fill(p + chunks.begin, p + chunks.end, std::uint16_t(0));
    return;
  }
  std::fill(p + chunks.begin, p + visible.begin, std::uint16_t(0));
  std::fill(p + visible.end, p + chunks.end, std::uint16_t(0));
  float* row = x + visible.begin;
  std::uint16_t* out = p + visible.begin;
  const index_t n = visible.size();
  const float* bias = nullptr;
  if constexpr (!std::same_as<Plan, empty_plan<float>>) {
    bias = plan_row<float>(plan, h, i, j0 + visible.begin);
    if (!bias) {  // FIRE's plan, a policy's own: it adds to scaled scores, in place
      amx::scale_bias_max(row, n, scale, nullptr);
      plan.add_row(h, i, j0 + visible.begin, n, row);
      scale = 1.0f;
    }
  }
  if (std::isfinite(row_max)) {
    const float sum = amx::exp_to_bf16(row, n, scale, bias, row_max, out);
    if (sum <= bf16_headroom) {  // false for NaN: the pass below decides
      row_sum += sum;
      return;
    }
  }
  const float tile_max = amx::scaled_max(row, n, scale, bias);
  if (std::isfinite(tile_max) && !std::isnan(row_max)) {
    if (tile_max > row_max) {  // a new reference: rescale what the row holds
      const float rescale = row_max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(row_max - tile_max);
      accumulator_row *= rescale;
      row_sum *= rescale;
      row_max = tile_max;
    }
    row_sum += amx::exp_to_bf16(row, n, scale, bias, row_max, out);
    return;
  }
  amx::scale_bias_max(row, n, scale, bias);
  online_softmax_row(row, n, n, row_max, row_sum, accumulator_row);
  for (index_t c = 0; c < n; ++c) out[c] = bf16_bits(row[c]);
}

/// Rows [r0, r0 + rows) of one strip (rows <= 32) of the item against the key block at column
/// c0 (bc real keys): scores, softmax rows, P V.
template <class Q, class Plan>
void bf16_forward_strip(const bf16_forward_problem<Q>& pb, const bf16_packed_kv& packed, const Plan& plan, const offset_band& band,
                        const sequence& seq, const query_tile& tile, index_t h, index_t c0, index_t bc, index_t r0, index_t rows,
                        const std::uint16_t* keys, const std::uint16_t* values, bf16_forward_scratch& s) {
  constexpr index_t ld = bf16_score_stride, ldp = bf16_p_stride;
  const index_t j0 = key_position(seq.k_start, c0), first_i = query_position(seq.q_start, tile.r0 + r0);
  const index_range columns{band.visible_keys(first_i, j0, bc).begin, band.visible_keys(first_i + rows - 1, j0, bc).end};
  if (columns.empty()) return;
  const index_range chunks{columns.begin / bf16_key_chunk * bf16_key_chunk, round_up(columns.end, bf16_key_chunk)};
  const index_t chunk_count = chunks.size() / bf16_key_chunk;
  amx::scores(s.q.data() + r0 * packed.dim_pad, packed.dim_pad, keys + (c0 + chunks.begin) * packed.dim_pad, packed.dim_pad / 32,
              chunk_count, s.scores.data() + chunks.begin, ld);
  for (index_t r = 0; r < rows; ++r) {
    const index_t i = first_i + r;
    bf16_softmax_row(plan, pb.scale, h, i, j0, band.visible_keys(i, j0, bc), chunks, s.scores.data() + r * ld, s.p.data() + r * ldp,
                     s.row_max[r0 + r], s.row_sum[r0 + r], s.accumulator_row(r0 + r));
  }
  const int halves = rows > 16 ? 2 : 1;
  for (index_t r = rows; r < 16 * halves; ++r)  // padding rows of the tile product: P = 0
    std::fill(s.p.data() + r * ldp + chunks.begin, s.p.data() + r * ldp + chunks.end, std::uint16_t(0));
  amx::values(s.p.data() + chunks.begin, ldp, values + (c0 + chunks.begin) * packed.dim_v_pad, packed.dim_v_pad / 16, 0,
              packed.dim_v_pad / 16, chunk_count, halves,
              s.accumulator.data() + r0 * s.dim_v_pad, s.dim_v_pad);
}

/// One work item: query rows [tile.r0, tile.r0 + tile.rows) of head h.
template <class Q, class Plan>
void bf16_forward_item(const bf16_forward_problem<Q>& pb, const bf16_packed_kv& packed, const Plan& plan, const offset_band& band,
                       const sequence& seq, const query_tile& tile, index_t h, bf16_forward_scratch& s) {
  const index_t br = tile.rows, b = seq.batch, kv_head = h / pb.group, first_row = seq.q_begin + tile.r0;
  for (index_t r = 0; r < round_up(br, bf16_strip_rows); ++r) {
    std::uint16_t* out = s.q.data() + r * packed.dim_pad;
    std::fill(out, out + packed.dim_pad, std::uint16_t(0));
    if (r < br)
      for (index_t d = 0; d < pb.q.dim; ++d) out[d] = bf16_bits(pb.q.row(b, first_row + r, h)[d]);
  }
  std::fill(s.accumulator.begin(), s.accumulator.end(), 0.0f);  // padding rows too: the tile products read whole strips
  s.row_max.head(br).setConstant(-std::numeric_limits<float>::infinity());
  s.row_sum.head(br).setZero();
  const std::uint16_t* keys = packed.keys_of(tile.sequence, pb.k.heads, kv_head);
  const std::uint16_t* values = packed.values_of(tile.sequence, pb.k.heads, kv_head);

  // The key blocks from the one holding the tile's diagonal (key position = the first query's
  // position) to the end, then from the start: a distance bias (ALiBi, T5, KERPLE) is largest
  // there, so the rows' first reference maximum is about their maximum and later blocks seldom
  // exceed bf16_headroom (in key order, ALiBi's maximum rose at every block: a redo each time).
  const index_t first = tile.keys.begin / bf16_key_chunk * bf16_key_chunk, blocks = (tile.keys.end - first + bf16_key_block - 1) / bf16_key_block;
  const index_t diagonal = query_position(seq.q_start, tile.r0) - seq.k_start;
  const index_t start = blocks > 0 ? (std::clamp(diagonal, first, tile.keys.end - 1) - first) / bf16_key_block : 0;
  amx::configure();
  for (index_t m = 0; m < blocks; ++m) {
    const index_t c0 = first + (start + m) % blocks * bf16_key_block, bc = std::min(bf16_key_block, seq.k_length - c0);
    for (index_t r0 = 0; r0 < br; r0 += bf16_strip_rows)
      bf16_forward_strip(pb, packed, plan, band, seq, tile, h, c0, bc, r0, std::min(bf16_strip_rows, br - r0), keys, values, s);
  }
  amx::release();

  for (index_t r = 0; r < br; ++r) {
    float* lse = pb.lse.empty() ? nullptr : &pb.lse[std::size_t(pb.lse_index(b, h, first_row + r))];
    normalise_row(s.row_max[r], s.row_sum[r], s.accumulator_row(r).head(pb.v.dim), pb.o.rows(b, h, first_row + r, 1).row(0), lse);
  }
}

/// The bf16 forward of a checked call: rows outside every sequence cleared, K and V packed,
/// then every (query tile, head) item, most keys first.
template <class Q, class Plan>
void bf16_fused_forward(const bf16_forward_problem<Q>& pb, const batch_layout& layout, const Plan& plan, int threads) {
  clear_rows_outside(pb, layout);
  const bf16_packed_kv packed = pack_kv(pb, layout, threads);
  const index_t heads = pb.q.heads;
  const std::vector<query_tile> tiles = query_tiles(layout, bf16_tile_rows);
  auto make_scratch = [&] {
    bf16_forward_scratch s{packed.dim_v_pad,
                           line_vector<std::uint16_t>(std::size_t(bf16_tile_rows * packed.dim_pad)),
                           line_vector<float>(std::size_t(bf16_strip_rows * bf16_score_stride)),
                           line_vector<std::uint16_t>(std::size_t(bf16_strip_rows * bf16_p_stride)),
                           line_vector<float>(std::size_t(bf16_tile_rows * packed.dim_v_pad)), Eigen::ArrayXf(bf16_tile_rows),
                           Eigen::ArrayXf(bf16_tile_rows)};
    return s;
  };
  parallel_items(index_t(tiles.size()) * heads, threads, make_scratch, [&](index_t item, bf16_forward_scratch& s) {
    const query_tile& tile = tiles[std::size_t(item / heads)];
    bf16_forward_item(pb, packed, plan, layout.band, layout.sequences[tile.sequence], tile, item % heads, s);
  });
}

}  // namespace relbias::detail

#pragma once
// Fused attention forward: tiled, online softmax (FlashAttention's recurrence, Dao et al. 2022),
// bias added on the fly from a per-call plan, never more than one strip of (8, Bc) scores per
// thread (detail/microkernel.hpp computes every tile product).
//
//   O = softmax(scale * Q K^T + B + mask) V,   B[r][c] = bias(h, q_start + r, k_start + c)
//
// Work items are (sequence, head, query tile), listed most expensive first and handed out
// dynamically, so causal attention (whose late query tiles see more keys) stays balanced.
// A query tile visits only the key tiles that meet its rows' visible keys (sequences.hpp):
// causal tiles after its last position, keys outside a sliding window, padding and other
// packed sequences are never touched.

#include "relbias/attention_options.hpp"
#include "relbias/attention_reference.hpp"
#include "relbias/concepts.hpp"
#include "relbias/detail/bias_plan.hpp"
#include "relbias/detail/checks.hpp"
#include "relbias/detail/exp.hpp"
#include "relbias/detail/layout.hpp"
#include "relbias/detail/microkernel.hpp"
#include "relbias/detail/parallel.hpp"
#include "relbias/offset.hpp"
#include "relbias/tensor.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>

namespace relbias {

namespace detail {

/// Tile sizes. A query tile's K and V tiles are packed once (K^T and V: 64 KiB each at D = 64)
/// and stay in L2 while the tile's query rows go past them a strip at a time; a strip's scores
/// (strip_rows x Bc: 17 KiB) stay in L1 from the product through the bias, the max and the exp.
/// Every query row of a tile shares one packing of each key tile: at 256 rows and D = 64 packing
/// costs about a tenth of the products, so long sequences take taller tiles (up to tall_rows).
struct tile_shape {
  index_t rows = 256;       // Br: queries per tile
  index_t cols = 256;       // Bc: keys per tile
  index_t tall_rows = 0;    // the tallest Br of sequences with work enough for tall tiles (0: never)

  /// A sequence's query tiles depend on that sequence alone, never on the rest of the batch or
  /// the thread count: where its rows fall in tiles decides which product computes them (a
  /// 1-row remainder takes the matrix-vector path) and where its key tiles start, so a sequence
  /// in a batch gives the bits it gives alone. Br is the tallest of tall_rows, tall_rows / 2, ...
  /// down to rows at which the sequence alone makes 32 work items (four per thread on 8 threads,
  /// for the dynamic schedule to balance causal tiles).
  index_t rows_for(const sequence& s, index_t heads) const {
    for (index_t r = tall_rows; r > rows; r /= 2)
      if ((s.q_length + r - 1) / r * heads >= 32) return r;
    return rows;
  }
};

/// The forward's tiles: 256 x 256, and for long sequences the tallest of 1024 and 512 rows whose
/// tile (Q and the output accumulator: Br rows; K^T and V: Bc rows) fills at most half of this
/// CPU's L2 (Eigen's cache query). Taller tiles pack each key tile fewer times: 1024 rows took
/// the fp32 forward from 0.64 to 0.66 of the FMA peak on a Sapphire Rapids class Xeon (2 MiB L2,
/// D = 64, L = 4096; docs/kernels.md); at 1 MiB (Zen 5) the rule keeps the 512 rows tuned there.
inline tile_shape forward_tiles(index_t dim, index_t value_dim, std::size_t element_size) {
  tile_shape tiles{.rows = 256, .cols = 256, .tall_rows = 512};
  const auto tile_bytes = [&](index_t rows) {
    return std::size_t((rows + tiles.cols) * (dim + value_dim)) * element_size;
  };
  if (2 * tile_bytes(1024) <= std::size_t(std::max<std::ptrdiff_t>(Eigen::l2CacheSize(), 0))) tiles.tall_rows = 1024;
  return tiles;
}

/// Query rows per strip: two row blocks of the micro-kernel, so that each K^T and V panel the
/// products read from L2 serves both from L1 (block_product's panel order).
inline constexpr index_t strip_rows = 2 * block_rows;

/// Everything one forward call shares across work items.
template <class S>
struct forward_problem {
  tensor_view<const S> q, k, v;
  tensor_view<S> o;
  std::span<S> lse;
  attention_options<S> options;
  S scale;
  index_t group;  // query heads per key/value head
  tile_shape tiles;

  index_t lse_index(index_t b, index_t h, index_t row) const { return (b * q.heads + h) * q.seq + row; }
};

template <class S>
struct forward_scratch {
  row_matrix<S> queries;      // (Br, D): the query tile, packed
  row_matrix<S> keys;         // (D, Bc padded): the key tile, transposed
  row_matrix<S> values;       // (Bc, Dv padded): the value tile, packed
  row_matrix<S> scores;       // (strip_rows, Bc padded): a strip's scores, then its probabilities
  row_matrix<S> accumulator;  // (Br, Dv): unnormalised output
  Eigen::Array<S, Eigen::Dynamic, 1> row_max, row_sum;  // (Br)
};

/// Adds bias[0, n) to x[0, n) (unless bias is null) and returns the largest x (-inf for n = 0),
/// in one packet pass. A NaN may be dropped: callers see it through the sum of exponentials
/// instead (online_softmax_row).
template <class S>
EIGEN_ALWAYS_INLINE S add_bias_and_max(S* x, const S* bias, index_t n) {
  namespace ei = Eigen::internal;
  constexpr index_t lanes = lanes_of<S>;
  auto max_p = ei::pset1<packet_of<S>>(-std::numeric_limits<S>::infinity());
  index_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    auto scores = ei::ploadu<packet_of<S>>(x + j);
    if (bias) {
      scores = ei::padd(scores, ei::ploadu<packet_of<S>>(bias + j));
      ei::pstoreu(x + j, scores);
    }
    max_p = ei::pmax(max_p, scores);
  }
  S result = ei::predux_max(max_p);
  for (; j < n; ++j) result = std::max(result, bias ? x[j] += bias[j] : x[j]);
  return result;
}

/// x = exp(x - shift) over x[0, n), in place (packet_exp, detail/exp.hpp); returns the sum.
/// Always inlined, as add_bias_and_max: once per row of 256 keys, the call's constant setup and
/// horizontal sum weighed (fp32 forward, no bias, one thread: 0.667 -> 0.676-0.680 of the peak).
/// The last partial packet goes through a buffer filled up with -inf (exp: exactly 0), not scalar
/// std::exp: causal rows end anywhere in a packet, and at length 64 those scalar calls took 4 % of
/// a training step (bench/quality, perf).
template <class S>
EIGEN_ALWAYS_INLINE S exp_shifted_sum(S* x, index_t n, S shift) {
  namespace ei = Eigen::internal;
  using packet = packet_of<S>;
  constexpr index_t lanes = lanes_of<S>;
  const auto shift_p = ei::pset1<packet>(shift);
  auto sum_p = ei::pset1<packet>(S(0));
  index_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    const auto p = packet_exp<S>(ei::psub(ei::ploadu<packet>(x + j), shift_p));
    ei::pstoreu(x + j, p);
    sum_p = ei::padd(sum_p, p);
  }
  if (j < n) {
    alignas(64) S tail[lanes];
    std::fill(std::copy(x + j, x + n, tail), tail + lanes, -std::numeric_limits<S>::infinity());
    const auto p = packet_exp<S>(ei::psub(ei::pload<packet>(tail), shift_p));
    ei::pstore(tail, p);
    std::copy(tail, tail + (n - j), x + j);
    sum_p = ei::padd(sum_p, p);
  }
  return ei::predux(sum_p);
}

/// One step of the online softmax for one row: folds the first `visible` of n new scores into
/// (max, sum), rescales the accumulator row, and leaves exp(score - max) in place for the P V
/// product, with exact zeros for the hidden keys (Eigen's exp of a very negative double is a
/// subnormal, not 0, so hidden keys never go through it). bias, if not null, holds the row's
/// bias over the visible keys (a table plan's slice), added in the pass that finds the maximum;
/// a second pass takes the exponentials and their sum.
///   -inf scores (a bias that hides keys, or a product that overflows) weigh exactly 0; while the
///   row has no finite score yet the whole tile is 0, never exp(-inf - -inf) = NaN.
///   A NaN score, or +inf (softmax has no finite weights then; PyTorch gives NaN too), makes the
///   row's sum (and, when no score is finite, its max) NaN, which every later step keeps: the
///   row's O and lse come out NaN.
template <class S, class AccumulatorRow>
void online_softmax_row(S* row, index_t visible, index_t n, S& row_max, S& row_sum, AccumulatorRow&& accumulator_row,
                        const S* bias = nullptr) {
  constexpr S inf = std::numeric_limits<S>::infinity();
  std::fill(row + visible, row + n, S(0));
  const S tile_max = add_bias_and_max(row, bias, visible);
  S new_max = std::isnan(row_max) || tile_max == inf ? std::numeric_limits<S>::quiet_NaN() : std::max(row_max, tile_max);
  if (new_max == -inf) {  // no finite score yet: P = 0, unless the max dropped a NaN
    if (std::none_of(row, row + visible, [](S x) { return std::isnan(x); })) {
      std::fill(row, row + visible, S(0));
      return;
    }
    new_max = std::numeric_limits<S>::quiet_NaN();
  }
  // exp(0) = 1 exactly: no call while the maximum stands (1.9 % of a forward's samples at L = 4096)
  const S rescale = row_max == -inf ? S(0) : row_max == new_max ? S(1) : std::exp(row_max - new_max);
  if (rescale != S(1)) accumulator_row *= rescale;  // NaN rescale: the accumulator turns NaN too
  row_sum = row_sum * rescale + exp_shifted_sum(row, visible, new_max);
  row_max = new_max;
}

/// Writes row r's output from the online-softmax state: O = acc / sum and lse = max + log(sum);
/// O = 0 and lse = -inf for a row without any visible key of finite score; NaN stays NaN.
template <class S, class OutRow, class AccumulatorRow>
void normalise_row(S row_max, S row_sum, const AccumulatorRow& accumulator_row, OutRow&& out, S* lse) {
  const bool empty = row_max == -std::numeric_limits<S>::infinity();
  if (empty) out.setZero();
  else out = accumulator_row / row_sum;
  if (lse) *lse = empty ? -std::numeric_limits<S>::infinity() : row_max + std::log(row_sum);
}

/// Decoding over a paged float cache: blocks of at least this many keys take one matrix-vector
/// product per run of rows in a block, straight from the pool (P V is then summed run by run:
/// within float rounding of a contiguous cache); smaller blocks gather each tile's rows first
/// (a copy, but one product per tile: the contiguous cache's bits). Measured with blocks laid
/// out [num_blocks, block, heads, d] (bench/decode.cpp, paged/fp32, Lk = 32768, one thread, a
/// loaded machine): gathering ran at about 0.8 of contiguous for every block size, products
/// per run at 0.65 (16 keys), 0.83 (64) and 1.0 (256).
inline constexpr index_t paged_product_rows = 64;

/// Calls product(element, row, column, count) for each run of keys [first, first + count) of
/// sequence s, having asked for the first rows of the next run and the first line of each of its
/// pages: the hardware prefetcher follows a run within a page, not the jump to the next block.
template <class S, class Product>
void for_each_run_prefetching(const tensor_view<const S>& t, const batch_layout& layout, std::size_t s, index_t h, index_t first,
                              index_t count, Product product) {
  constexpr index_t ahead = 8;
  struct run {
    index_t element = -1, row = 0, column = 0, count = 0;
  } previous;
  layout.key_runs(s, first, count, [&](index_t element, index_t row, index_t column, index_t rows) {
    prefetch_rows(t.row(element, row, h), t.seq_stride, std::min(ahead, rows), t.dim);
    prefetch_pages(t.row(element, row, h), t.seq_stride, rows);
    if (previous.element >= 0) product(previous.element, previous.row, previous.column, previous.count);
    previous = {element, row, column, rows};
  });
  if (previous.element >= 0) product(previous.element, previous.row, previous.column, previous.count);
}

/// Rows [first, first + count) of sequence s's keys (t: k or v, head h) copied into `out`
/// (count, t.dim) contiguous: a paged tile's rows for the matrix-vector products of decoding.
template <class S>
void gather_key_rows(const tensor_view<const S>& t, const batch_layout& layout, std::size_t s, index_t h, index_t first, index_t count,
                     S* out) {
  namespace ei = Eigen::internal;
  constexpr index_t lanes = lanes_of<S>;
  const index_t dim = t.dim, full = dim / lanes * lanes;
  layout.key_runs(s, first, count, [&](index_t element, index_t row, index_t column, index_t rows) {
    for (index_t c = 0; c < rows; ++c) {  // packet copies: memcpy per row of 64 floats took 60 instructions
      const S* from = t.row(element, row + c, h);
      S* to = out + (column + c) * dim;
      for (index_t d = 0; d < full; d += lanes) ei::pstoreu(to + d, ei::ploadu<packet_of<S>>(from + d));
      for (index_t d = full; d < dim; ++d) to[d] = from[d];
    }
  });
}

/// Scores of rows [r0, r0 + n) of a query tile against key columns `columns` of the key tile at
/// c0, into the strip buffer: by the micro-kernel from the packed tiles, or (packed = false: a
/// tile of fewer rows than a block, i.e. decoding) by Eigen's matrix-vector products straight
/// from K, which read each key once instead of transposing it first.
template <class S>
void strip_scores(const forward_problem<S>& pb, const batch_layout& layout, const query_tile& tile, index_t h, index_t c0,
                  index_range columns, index_t r0, index_t n, bool packed, forward_scratch<S>& s) {
  const index_t dim = pb.q.dim, ld = s.scores.cols();
  S* out = s.scores.data() + columns.begin;
  if (packed) {
    block_product<S>(n, columns.size(), dim, {s.queries.data() + r0 * dim, dim, 1}, {s.keys.data() + columns.begin, s.keys.cols()},
                     {out, ld}, pb.scale, false);
    return;
  }
  const sequence& seq = layout.sequences[tile.sequence];
  const auto queries = pb.q.rows(seq.batch, h, seq.q_begin + tile.r0 + r0, n);  // (n, D)
  Eigen::Map<row_matrix<S>, 0, Eigen::OuterStride<>> strip(out, n, columns.size(), Eigen::OuterStride<>(ld));
  if (!layout.paged) {
    strip.noalias() = pb.scale * (queries * pb.k.rows(seq.batch, h / pb.group, seq.k_begin + c0 + columns.begin, columns.size()).transpose());
    return;
  }
  if (layout.paged->block_size >= paged_product_rows) {  // one product per run, the next run's first rows prefetched
    for_each_run_prefetching(pb.k, layout, tile.sequence, h / pb.group, c0 + columns.begin, columns.size(),
                             [&](index_t element, index_t row, index_t column, index_t count) {
                               Eigen::Map<row_matrix<S>, 0, Eigen::OuterStride<>> part(out + column, n, count, Eigen::OuterStride<>(ld));
                               part.noalias() = pb.scale * (queries * pb.k.rows(element, h / pb.group, row, count).transpose());
                             });
    return;
  }
  // Small blocks: the tile's rows gathered into the packed key buffer (unused when decoding) for
  // one product over the whole tile, the call a contiguous cache makes (a product per run of 16
  // keys cost a third of the step).
  gather_key_rows(pb.k, layout, tile.sequence, h / pb.group, c0 + columns.begin, columns.size(), s.keys.data());
  strip.noalias() = pb.scale * (queries * Eigen::Map<const row_matrix<S>>(s.keys.data(), columns.size(), dim).transpose());
}

/// acc rows [r0, r0 + n) += P V over the key columns `columns` (packed or not, as strip_scores).
template <class S>
void strip_values(const forward_problem<S>& pb, const batch_layout& layout, const query_tile& tile, index_t h, index_t c0,
                  index_range columns, index_t r0, index_t n, bool packed, forward_scratch<S>& s) {
  const index_t dim_v = pb.v.dim, ld = s.scores.cols();
  const S* p = s.scores.data() + columns.begin;
  if (packed) {
    block_product<S>(n, dim_v, columns.size(), {p, ld, 1}, {s.values.data() + columns.begin * s.values.cols(), s.values.cols()},
                     {&s.accumulator(r0, 0), dim_v}, S(1), true);
    return;
  }
  Eigen::Map<const row_matrix<S>, 0, Eigen::OuterStride<>> strip(p, n, columns.size(), Eigen::OuterStride<>(ld));
  const sequence& seq = layout.sequences[tile.sequence];
  if (!layout.paged) {
    s.accumulator.middleRows(r0, n).noalias() += strip * pb.v.rows(seq.batch, h / pb.group, seq.k_begin + c0 + columns.begin, columns.size());
    return;
  }
  if (layout.paged->block_size >= paged_product_rows) {  // as strip_scores: P V summed run by run
    for_each_run_prefetching(pb.v, layout, tile.sequence, h / pb.group, c0 + columns.begin, columns.size(),
                             [&](index_t element, index_t row, index_t column, index_t count) {
                               Eigen::Map<const row_matrix<S>, 0, Eigen::OuterStride<>> part(p + column, n, count, Eigen::OuterStride<>(ld));
                               s.accumulator.middleRows(r0, n).noalias() += part * pb.v.rows(element, h / pb.group, row, count);
                             });
    return;
  }
  gather_key_rows(pb.v, layout, tile.sequence, h / pb.group, c0 + columns.begin, columns.size(), s.values.data());  // as strip_scores
  s.accumulator.middleRows(r0, n).noalias() += strip * Eigen::Map<const row_matrix<S>>(s.values.data(), columns.size(), dim_v);
}

/// The bias of query position i over the visible columns of the key tile at c0. Keys at
/// consecutive positions (always, unless options.k_positions says otherwise) take the plan's
/// row: returned when it is a table slice (the softmax's max pass adds it), else added to
/// row[visible) here. Explicit key positions go run by run of consecutive positions, so a
/// shift-invariant policy still reads its table (a StreamingLLM cache: the sinks, then the window).
template <class S, class Plan>
const S* visible_row_bias(const Plan& plan, const sequence_positions& pos, index_t h, index_t i, index_t c0, index_range visible,
                          S* row) {
  const index_t first = c0 + visible.begin;
  if (pos.consecutive_keys(first, visible.size())) {
    const index_t j0 = pos.key(first);
    if (const S* slice = plan_row<S>(plan, h, i, j0)) return slice;
    plan.add_row(h, i, j0, visible.size(), row + visible.begin);
    return nullptr;
  }
  for (index_t c = visible.begin; c < visible.end;) {
    index_t end = c + 1;
    while (end < visible.end && pos.key(c0 + end) == pos.key(c0 + end - 1) + 1) ++end;
    plan.add_row(h, i, pos.key(c0 + c), end - c, row + c);
    c = end;
  }
  return nullptr;
}

/// Of the strip's rows (positions p.query(first + r), r < n), the key tile columns each sees,
/// clamped into their hull `columns` (returned): rows that see nothing get an empty range there.
inline index_range strip_visible(const sequence_positions& p, const offset_band& band, index_t first, index_t n, index_t c0,
                                 index_t bc, index_range* visible) {
  for (index_t r = 0; r < n; ++r) visible[r] = p.visible_keys(band, p.query(first + r), c0, bc);
  if (!p.q) return {visible[0].begin, visible[n - 1].end};  // the band's ends grow with the position
  index_range hull{bc, 0};
  for (index_t r = 0; r < n; ++r)
    if (!visible[r].empty()) hull = {std::min(hull.begin, visible[r].begin), std::max(hull.end, visible[r].end)};
  if (hull.empty()) return {};
  for (index_t r = 0; r < n; ++r)
    visible[r] = visible[r].empty() ? index_range{hull.begin, hull.begin} : visible[r];
  return hull;
}

/// One strip of rows [r0, r0 + n) of a query tile against the key tile at c0: scores, then bias,
/// online softmax and P V while the strip is in L1. Only the columns some row of the strip sees
/// are computed (visible ranges grow with the query position), so causal diagonals and sliding
/// windows cost a strip, not a tile.
template <class S, class Plan>
void forward_strip(const forward_problem<S>& pb, const Plan& plan, const batch_layout& layout, const query_tile& tile, index_t h,
                   index_t c0, index_t bc, index_t r0, index_t n, bool packed, forward_scratch<S>& s) {
  const sequence_positions& pos = layout.positions[tile.sequence];
  const index_t ld = s.scores.cols();
  index_range visible[strip_rows];  // n <= strip_rows
  const index_range columns = strip_visible(pos, layout.band, tile.r0 + r0, n, c0, bc, visible);
  if (columns.empty()) return;  // no row sees a key here: the online softmax state stays as it is
  strip_scores(pb, layout, tile, h, c0, columns, r0, n, packed, s);
  for (index_t r = 0; r < n; ++r) {
    S* row = s.scores.data() + r * ld;
    std::fill(row + columns.begin, row + visible[r].begin, S(0));
    // A row that sees no key of this tile reads no bias: its offsets may lie outside the plan's window.
    // A table plan's slice is added in the softmax's max pass; other plans add their bias here.
    const S* bias = nullptr;
    if (!visible[r].empty()) bias = visible_row_bias(plan, pos, h, pos.query(tile.r0 + r0 + r), c0, visible[r], row);
    online_softmax_row(row + visible[r].begin, visible[r].size(), columns.end - visible[r].begin, s.row_max[r0 + r], s.row_sum[r0 + r],
                       s.accumulator.row(r0 + r), bias);
  }
  strip_values(pb, layout, tile, h, c0, columns, r0, n, packed, s);
}

/// During the last 8 strips over a key tile, each strip requests its share of the next key
/// tile's K and V rows, shortly before they are packed (alternated runs at L = 4096: up to 1.1x
/// faster than without, never slower). r0: the strip's first row in the query tile.
template <class S>
void prefetch_next_key_tile(const forward_problem<S>& pb, const batch_layout& layout, const query_tile& tile, index_t kv_head,
                            index_t c0, index_t r0) {
  constexpr index_t fetching_strips = 8;
  const index_t next = c0 + pb.tiles.cols, strips_left = (tile.rows - r0 + strip_rows - 1) / strip_rows;
  if (next >= tile.keys.end || strips_left > fetching_strips) return;
  const index_t next_bc = std::min(pb.tiles.cols, tile.keys.end - next);
  const index_t fetching = std::min(fetching_strips, (tile.rows + strip_rows - 1) / strip_rows);
  const index_t share = (next_bc + fetching - 1) / fetching, first = (fetching - strips_left) * share;
  const index_t count = std::min(share, next_bc - first);
  if (count <= 0) return;
  layout.key_runs(tile.sequence, next + first, count, [&](index_t element, index_t row, index_t, index_t rows) {
    prefetch_rows(pb.k.row(element, row, kv_head), pb.k.seq_stride, rows, pb.k.dim);
    prefetch_rows(pb.v.row(element, row, kv_head), pb.v.seq_stride, rows, pb.v.dim);
  });
}

/// Decoding over a paged cache (tiles read unpacked, run by run), at the start of each key tile:
/// asks for the first rows of each of its V runs (read after its K), so that no V run waits for
/// memory at its start. Not asked for: the pages of the next tile's runs. With
/// for_each_run_prefetching's page requests they took blocks of 64 keys (bench_decode paged/fp32,
/// Lk = 32768, one thread) from 0.90-0.93 of a contiguous cache's tokens/s to 0.93-0.98 on one
/// Sapphire Rapids class VM, and from 0.91 down to 0.85-0.90 on another (docs/paged.md).
template <class S>
void prefetch_decoding_runs(const forward_problem<S>& pb, const batch_layout& layout, const query_tile& tile, index_t kv_head,
                            index_t c0, index_t bc) {
  constexpr index_t ahead = 8;
  layout.key_runs(tile.sequence, c0, bc, [&](index_t element, index_t row, index_t, index_t rows) {
    prefetch_rows(pb.v.row(element, row, kv_head), pb.v.seq_stride, std::min(ahead, rows), pb.v.dim);
  });
}

/// Packing K and V costs about a twentieth of a 256-row tile's products, but more than the
/// products themselves for the one row of a decoding step: tiles of fewer rows than a block read
/// K and V unpacked. Packing gathers a paged cache's runs into the same tiles a contiguous cache
/// gives, so prefill over a paged cache has the contiguous cache's bits.
template <class S, class Plan>
void forward_query_tile(const forward_problem<S>& pb, const Plan& plan, const batch_layout& layout, const query_tile& tile, index_t h,
                        forward_scratch<S>& s) {
  const sequence& seq = layout.sequences[tile.sequence];
  const index_t br = tile.rows, b = seq.batch, first_row = seq.q_begin + tile.r0;
  const index_t kv_head = h / pb.group, dim = pb.q.dim, dim_v = pb.v.dim;
  const bool packed = br >= block_rows;
  if (packed) pack_rows(pb.q.row(b, first_row, h), pb.q.seq_stride, br, dim, s.queries.data());  // (Br, D)
  s.accumulator.topRows(br).setZero();
  s.row_max.setConstant(-std::numeric_limits<S>::infinity());
  s.row_sum.setZero();

  for (index_t c0 = tile.keys.begin; c0 < tile.keys.end; c0 += pb.tiles.cols) {
    const index_t bc = std::min(pb.tiles.cols, tile.keys.end - c0);
    if (packed)
      layout.key_runs(tile.sequence, c0, bc, [&](index_t element, index_t row, index_t column, index_t count) {
        pack_transposed(pb.k.row(element, row, kv_head), pb.k.seq_stride, count, dim, s.keys.data() + column, s.keys.cols());
        pack_rows(pb.v.row(element, row, kv_head), pb.v.seq_stride, count, dim_v, s.values.data() + column * s.values.cols(),
                  s.values.cols());
      });
    if (!packed && layout.paged) prefetch_decoding_runs(pb, layout, tile, kv_head, c0, bc);
    for (index_t r0 = 0; r0 < br; r0 += strip_rows) {
      if (packed) prefetch_next_key_tile(pb, layout, tile, kv_head, c0, r0);
      forward_strip(pb, plan, layout, tile, h, c0, bc, r0, std::min<index_t>(strip_rows, br - r0), packed, s);
    }
  }

  auto out = pb.o.rows(b, h, first_row, br);  // (Br, Dv)
  for (index_t r = 0; r < br; ++r) {
    S* lse = pb.lse.empty() ? nullptr : &pb.lse[std::size_t(pb.lse_index(b, h, first_row + r))];
    normalise_row(s.row_max[r], s.row_sum[r], s.accumulator.row(r), out.row(r), lse);
  }
}

/// Rows of q outside every sequence (padding) get the result of a row that sees no key.
/// Problem: a forward problem (o, lse, lse_index, q), of any storage (attention_half.hpp too).
template <class Problem>
void clear_rows_outside(const Problem& pb, const batch_layout& layout) {
  using S = typename decltype(pb.lse)::value_type;
  for_each_row_outside(layout, pb.q.batch, pb.q.seq, true, [&](index_t b, index_t r) {
    zero_row(pb.o, b, r);
    if (!pb.lse.empty())
      for (index_t h = 0; h < pb.q.heads; ++h) pb.lse[std::size_t(pb.lse_index(b, h, r))] = -std::numeric_limits<S>::infinity();
  });
}

template <class S, class Plan>
void fused_forward(const forward_problem<S>& pb, const batch_layout& layout, const Plan& plan) {
  clear_rows_outside(pb, layout);
  const index_t heads = pb.q.heads;
  const std::vector<query_tile> tiles =  // most keys first
      query_tiles(layout, [&](const sequence& seq) { return pb.tiles.rows_for(seq, heads); });
  index_t max_rows = 0;
  for (const query_tile& tile : tiles) max_rows = std::max(max_rows, tile.rows);
  auto make_scratch = [&] {
    forward_scratch<S> s;
    s.queries.resize(max_rows, pb.q.dim);
    s.keys.resize(pb.q.dim, padded_to_line<S>(pb.tiles.cols));
    s.values.resize(pb.tiles.cols, padded_to_line<S>(pb.v.dim));
    s.scores.resize(strip_rows, padded_to_line<S>(pb.tiles.cols));
    s.accumulator.resize(max_rows, pb.v.dim);
    s.row_max.resize(max_rows);
    s.row_sum.resize(max_rows);
    return s;
  };
  parallel_items(index_t(tiles.size()) * heads, thread_count(pb.options.num_threads), make_scratch,
                 [&](index_t item, forward_scratch<S>& s) {
                   const query_tile& tile = tiles[std::size_t(item / heads)];
                   forward_query_tile(pb, plan, layout, tile, item % heads, s);
                 });
}

/// The forward's contract: every argument check of relbias::attention, in its order. The ring
/// (distributed/ring_attention.hpp) runs it on each rank's shard and the 16-bit forward
/// (attention_half.hpp) on its own types, so every entry point rejects the same calls with the
/// same messages. Q, KV: the element types of q and of k, v; S: of o, lse and the options.
template <class Bias, class Q, class KV, class S>
void check_attention_call(const char* where, const tensor_view<const Q>& q, const tensor_view<const KV>& k,
                          const tensor_view<const KV>& v, const Bias& bias, const attention_options<S>& options,
                          const tensor_view<S>& o, std::span<S> lse) {
  check_qkv(where, q, k, v, index_t(bias.num_heads()), options);
  check_bias_mode(where, bias, options);
  check_sequences(where, q, k, options);
  check_outputs(where, q, v, o, lse, false);
  check_no_aliasing(where, {block_of("o", o), block_of("lse", lse)},
                    {block_of("q", q), block_of("k", k), block_of("v", v), parameter_block(bias)});
}

}  // namespace detail

/// Fused forward. q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] (Hq a multiple of Hk:
/// grouped- and multi-query attention), o [B, Lq, Hq, Dv]; lse, if not empty, receives
/// B * Hq * Lq values laid out [b][h][row]. Any strides with a contiguous last axis work
/// (bshd(), bhsd()). A row that sees no key of finite score gets O = 0 and lse = -inf; a NaN
/// or +inf score among a row's visible keys makes its O and lse NaN. Throws
/// std::invalid_argument for bad shapes, positions outside [0, 2^62], outputs that overlap
/// inputs or themselves, a policy whose mode() contradicts options.mask (README, "Errors").
/// options.sequences runs a padded, packed or decoding batch in one call, options.sliding_window
/// local attention (sequences.hpp); rows of q outside every sequence are such rows.
template <bias_policy Bias, class S = typename Bias::scalar_type>
void attention(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, const Bias& bias,
               const attention_options<S>& options, output_tensor<S> o, output_span<S> lse = {}) {
  // Preconditions
  detail::check_attention_call("relbias::attention", q, k, v, bias, options, o, lse);

  const detail::batch_layout layout = detail::make_layout(options, q.batch, q.seq, k.seq);
  const int threads = detail::thread_count(options.num_threads);
  const detail::forward_problem<S> pb{q, k, v, o, lse, options, options.scale_for(q.dim), q.heads / k.heads,
                                      detail::forward_tiles(q.dim, v.dim, sizeof(S))};
  const auto plan = detail::make_bias_plan(bias, detail::visited_window(layout), threads);
  detail::fused_forward(pb, layout, plan);
}

/// Fused forward returning owning O and lse.
template <bias_policy Bias, class S = typename Bias::scalar_type>
attention_result<S> attention(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, const Bias& bias,
                              const attention_options<S>& options = {}) {
  detail::check_qkv("relbias::attention", q, k, v, index_t(bias.num_heads()), options);
  detail::check_result_sizes("relbias::attention", q, v);
  detail::check_sequences("relbias::attention", q, k, options);
  attention_result<S> result{tensor<S>(q.batch, q.seq, q.heads, v.dim), std::vector<S>(std::size_t(q.batch * q.heads * q.seq))};
  attention(q, k, v, bias, options, result.out.view(), std::span<S>(result.lse));
  return result;
}

}  // namespace relbias

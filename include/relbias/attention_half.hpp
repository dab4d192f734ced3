#pragma once
// Fused forward over 16-bit storage: k and v (a KV cache) in Eigen::half or Eigen::bfloat16, q
// in the same format or in float. Products, softmax and output are float, as in attention():
//
//   O = softmax(scale * Q K^T + B + mask) V,   every element of Q, K, V widened to float on load
//
// A work item is (sequence, key/value head, block of query rows) with the query heads of that
// key/value head (GQA), and reads each key block of its K and V once, with the online softmax
// of attention.hpp. A decoding item (a few rows) streams the 16-bit rows straight into fused
// widen-and-FMA dot products and axpys, prefetching ahead: 2 bytes per element come from
// memory, half of a float cache, and no float copy is written. A larger item widens each key
// block into a float tile in L2 for Eigen's matrix products. Never is the whole cache widened.
// With fewer items than threads (one sequence, few key/value heads) each query head is an item
// of its own, trading one read of K and V per group for the threads. A paged cache
// (options.paged, paged.hpp) is read through its block table: a streamed item walks the rows of
// each block as a contiguous cache's and reads the table once per block (streamed_block), a
// larger one widens the runs of blocks into the same float tile.
//
// The backward over 16-bit storage (attention_backward below) widens q, k, v, o and d_out to
// float and runs the float backward, or, opted in with compute_precision::bf16 on a CPU with
// AMX, multiplies in bf16 tiles (detail/amx_backward.hpp).

#include "relbias/attention.hpp"
#include "relbias/attention_backward.hpp"
#include "relbias/detail/amx_backward.hpp"
#include "relbias/detail/amx_forward.hpp"
#include "relbias/detail/storage.hpp"

#include <algorithm>
#include <array>
#include <concepts>
#include <limits>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace relbias {

/// The element types attention() takes from 16-bit storage: k and v of one format (half or
/// bfloat16, const or not), q of that format or float.
template <class Q, class K, class V>
concept half_attention_inputs =
    half_storage<std::remove_const_t<K>> && std::same_as<std::remove_const_t<K>, std::remove_const_t<V>> &&
    (std::same_as<std::remove_const_t<Q>, std::remove_const_t<K>> || std::same_as<std::remove_const_t<Q>, float>);

namespace detail {

/// Everything one 16-bit forward call shares across work items. Q and KV may be float too (the
/// decode benchmark runs a float cache through the same loop).
template <class Q, class KV>
struct half_forward_problem {
  tensor_view<const Q> q;
  tensor_view<const KV> k, v;
  tensor_view<float> o;
  std::span<float> lse;
  float scale;
  index_t group;           // query heads per key/value head
  index_t heads_per_item;  // group, or 1 when the call has fewer (tile, key/value head) pairs than threads
  index_t block_rows;      // query rows per item and head
  tile_shape tiles;
  index_t streamed_rows = 8;  // items of at most this many rows stream K and V (see streamed_scores)

  index_t lse_index(index_t b, index_t h, index_t row) const { return (b * q.heads + h) * q.seq + row; }
};

/// A run of a streamed item's keys in consecutive rows: the offsets from k.data and v.data of
/// its first key's rows, and its length.
struct key_run {
  index_t k, v, count;
};

struct half_forward_scratch {
  row_matrix<float> q;            // (R, D): the item's queries, R = heads_per_item * block rows
  row_matrix<float> k, v;         // (Bc, D), (Bc, Dv): one key block widened
  row_matrix<float> scores;       // (R, Bc)
  row_matrix<float> accumulator;  // (R, Dv)
  Eigen::ArrayXf row_max, row_sum;
  // Streamed items: the key block's runs and the next block's.
  std::vector<key_run> runs{}, ahead_runs{};
};

/// Asks for the cache lines of one stored row ahead of its use. A decoding step is one long
/// stream per thread whose rows are used a few instructions after they are loaded: with 16-bit
/// rows the loads in flight alone do not keep the memory busy (measured: 1.6x the float cache's
/// speed without prefetching, against the 2x its bytes allow).
template <class T>
void prefetch_row(const T* row, index_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (index_t offset = 0; offset < dim * index_t(sizeof(T)); offset += 64) __builtin_prefetch(bytes + offset);
}

/// Prefetches the k rows of the next key block, given as runs (a contiguous cache's block is
/// one run; a paged cache's, one run per pool block): pair(c) asks for keys c and c + 1 (those
/// below count), a cursor walking the runs as the pairs come in column order.
template <class KV>
struct key_prefetch {
  const KV* k;
  std::span<const key_run> runs;  // count keys in all
  index_t count, stride, dim;
  std::size_t run = 0;
  index_t run_begin = 0;  // column of runs[run]'s first key

  void pair(index_t c) {
    for (index_t ahead = c; ahead < std::min(c + 2, count); ++ahead) {
      while (ahead - run_begin >= runs[run].count) run_begin += runs[run++].count;
      prefetch_row(k + runs[run].k + (ahead - run_begin) * stride, dim);
    }
  }
};

/// Loads one byte of each 4 KiB page that rows [0, count) of `first` (stride elements apart)
/// lie in, and of the last row: done for the next key block, a block ahead of its use, so that
/// the page walks happen then (bytes, so that the load happens whatever the element type).
/// Measured (bench_decode paged/bf16, Lk = 32768, one thread, Intel Sapphire Rapids class): with
/// the prefetches alone each new page waited for a demand load; touching its pages a block ahead
/// took the contiguous step from 5.1 to 3.7 ms and blocks of 64 keys from 5.5 to 4.1 ms.
template <class KV>
void touch_pages(const KV* first, index_t count, index_t stride) {
  if (count <= 0) return;
  const volatile unsigned char* bytes = reinterpret_cast<const unsigned char*>(first);
  const index_t row_bytes = stride * index_t(sizeof(KV)), per_page = std::max<index_t>(1, 4096 / row_bytes);
  for (index_t r = 0; r < count; r += per_page) (void)bytes[r * row_bytes];
  (void)bytes[(count - 1) * row_bytes];
}

using float_rows_map = Eigen::Map<const row_matrix<float>, 0, Eigen::OuterStride<>>;

/// Rows [first, first + count) of head h in batch b as floats (count, dim): a float view's own
/// memory, or the rows widened into `buffer` (at least count x dim).
template <class T>
float_rows_map float_rows(const tensor_view<const T>& t, index_t b, index_t h, index_t first, index_t count,
                          row_matrix<float>& buffer) {
  if constexpr (std::same_as<T, float>) {
    return float_rows_map(t.row(b, first, h), count, t.dim, Eigen::OuterStride<>(t.seq_stride));
  } else {
    for (index_t n = 0; n < count; ++n) widen(t.row(b, first + n, h), t.dim, &buffer(n, 0));
    return float_rows_map(buffer.data(), count, t.dim, Eigen::OuterStride<>(buffer.cols()));
  }
}

/// Columns [c0, c0 + count) of sequence s's keys (or values, t) of head h as floats: float_rows
/// of the one run of a contiguous cache; a paged cache's runs widened (or copied) into buffer.
template <class T>
float_rows_map float_key_rows(const tensor_view<const T>& t, const batch_layout& layout, std::size_t s, index_t h, index_t c0,
                              index_t count, row_matrix<float>& buffer) {
  if (!layout.paged) {
    const sequence& seq = layout.sequences[s];
    return float_rows(t, seq.batch, h, seq.k_begin + c0, count, buffer);
  }
  layout.key_runs(s, c0, count, [&](index_t element, index_t row, index_t column, index_t n) {
    for (index_t c = 0; c < n; ++c) widen(t.row(element, row + c, h), t.dim, &buffer(column + c, 0));
  });
  return float_rows_map(buffer.data(), count, t.dim, Eigen::OuterStride<>(buffer.cols()));
}

// Items of at most problem.streamed_rows rows (decoding: a step's query heads of one key/value
// head) read K and V as they stream by, one dot product and one axpy per key and row; larger
// items widen each key block into a float tile for the matrix products, which amortise the
// widening over many rows. Streaming saves writing and re-reading that tile, which costs a
// decoding step more than the bytes it saves.

/// scores(rho, c) = scale * q.row(rho) . float(key c), the keys run after run, prefetching their
/// v rows, which come next.
template <class Q, class KV, class Runs, class Rows, class Scores>
void streamed_scores(const half_forward_problem<Q, KV>& pb, const Runs& runs, const Rows& q, Scores& scores) {
  index_t c = 0;
  for (const key_run& run : runs) {
    const KV *k = pb.k.data + run.k, *v = pb.v.data + run.v;
    for (index_t i = 0; i < run.count; ++i, ++c) {
      prefetch_row(v + i * pb.v.seq_stride, pb.v.dim);
      const KV* key = k + i * pb.k.seq_stride;
      for (index_t rho = 0; rho < scores.rows(); ++rho) scores(rho, c) = pb.scale * dot_widened(&q(rho, 0), key, pb.k.dim);
    }
  }
}

/// acc.row(rho) += sum over c of scores(rho, c) * float(value c), keys paired (0, 1), (2, 3), ...
/// by column whatever the runs (a pair may straddle two blocks; an odd last key pairs with
/// weight 0 against itself), so a paged cache sums in a contiguous cache's order: same bits.
/// Each pair prefetches two keys of the next block (`ahead`).
template <class Q, class KV, class Runs, class Prefetch, class Scores, class Accumulator>
void streamed_values(const half_forward_problem<Q, KV>& pb, const Runs& runs, Prefetch ahead, const Scores& scores,
                     Accumulator& acc) {
  const index_t n = scores.cols(), stride = pb.v.seq_stride;
  const auto add_pair = [&](index_t c, const KV* v0, const KV* v1) {  // keys c and c + 1 (weight 0 past n)
    ahead.pair(c);
    const bool last = c + 1 == n;
    for (index_t rho = 0; rho < scores.rows(); ++rho)
      axpy2_widened(scores(rho, c), v0, last ? 0.0f : scores(rho, c + 1), v1, pb.v.dim, &acc(rho, 0));
  };
  index_t c = 0;            // column of the run's first key
  const KV* odd = nullptr;  // with c odd: key c - 1's v row, waiting for its partner
  for (const key_run& run : runs) {
    const KV* v = pb.v.data + run.v;
    index_t i = 0;
    if (odd) {
      add_pair(c - 1, odd, v);
      i = 1;
    }
    for (; i + 1 < run.count; i += 2) add_pair(c + i, v + i * stride, v + (i + 1) * stride);
    odd = i < run.count ? v + i * stride : nullptr;
    c += run.count;
  }
  if (odd) add_pair(c - 1, odd, odd);
}

/// Scores and then P V of a streamed item's key block at c0 (bc >= 1 keys); between them,
/// softmax(scores) does the bias and the online softmax. The loops walk the block's keys as runs
/// with plain strides: a contiguous cache's block is one run; a paged cache's runs (one per pool
/// block, the table read once per block) are looked up first. (Offsets per key, filled for the
/// block and the next one and loaded per key, cost 6-9 % of a decoding step even over a single
/// pool block.) The next block's runs are looked up too: its pages touched, its k rows prefetched.
template <class Q, class KV, class Rows, class Scores, class Accumulator, class Softmax>
void streamed_block(const half_forward_problem<Q, KV>& pb, const batch_layout& layout, const query_tile& tile, index_t kv_head,
                    index_t c0, const Rows& q, Scores& scores, Accumulator& acc, half_forward_scratch& s, Softmax softmax) {
  const sequence& seq = layout.sequences[tile.sequence];
  const index_t bc = scores.cols(), ahead_count = std::min(pb.tiles.cols, tile.keys.end - c0 - bc);  // the next block's keys
  const auto runs_of = [&](index_t first, index_t count, std::vector<key_run>& runs) {
    runs.clear();
    if (count == 0) return;
    if (!layout.paged) {
      runs.push_back({pb.k.row(seq.batch, seq.k_begin + first, kv_head) - pb.k.data,
                      pb.v.row(seq.batch, seq.k_begin + first, kv_head) - pb.v.data, count});
      return;
    }
    layout.key_runs(tile.sequence, first, count, [&](index_t element, index_t row, index_t, index_t n) {
      runs.push_back({pb.k.row(element, row, kv_head) - pb.k.data, pb.v.row(element, row, kv_head) - pb.v.data, n});
    });
  };
  runs_of(c0, bc, s.runs);
  runs_of(c0 + bc, ahead_count, s.ahead_runs);
  for (const key_run& run : s.ahead_runs) {
    touch_pages(pb.k.data + run.k, run.count, pb.k.seq_stride);
    touch_pages(pb.v.data + run.v, run.count, pb.v.seq_stride);
  }
  // Not asked for: the pages of the block after the next. It gained 2-4 % on one Sapphire Rapids
  // class VM and cost 8 % on another, even with no block ends (docs/paged.md, bench_decode paged/bf16).
  streamed_scores(pb, s.runs, q, scores);
  softmax(scores);
  streamed_values(pb, s.runs, key_prefetch<KV>{pb.k.data, s.ahead_runs, ahead_count, pb.k.seq_stride, pb.k.dim}, scores, acc);
}

/// One work item: query rows [tile.r0, tile.r0 + tile.rows) of `seq` for query heads
/// [first_head, first_head + heads_per_item), all of key/value head first_head / group. Row rho
/// of the item's tiles is head first_head + rho / tile.rows, query row tile.r0 + rho % tile.rows.
template <class Q, class KV, class Plan>
void half_forward_item(const half_forward_problem<Q, KV>& pb, const Plan& plan, const batch_layout& layout, const query_tile& tile,
                       index_t first_head, half_forward_scratch& s) {
  const sequence& seq = layout.sequences[tile.sequence];
  const sequence_positions& pos = layout.positions[tile.sequence];
  const index_t rows = tile.rows, count = rows * pb.heads_per_item, b = seq.batch, kv_head = first_head / pb.group;
  const auto head_of = [&](index_t rho) { return first_head + rho / rows; };
  const auto row_of = [&](index_t rho) { return tile.r0 + rho % rows; };
  for (index_t n = 0; n < pb.heads_per_item; ++n)
    for (index_t r = 0; r < rows; ++r) widen(pb.q.row(b, seq.q_begin + tile.r0 + r, first_head + n), pb.q.dim, &s.q(n * rows + r, 0));
  const auto q = s.q.topRows(count);     // (R, D)
  auto acc = s.accumulator.topRows(count);  // (R, Dv)
  acc.setZero();
  s.row_max.head(count).setConstant(-std::numeric_limits<float>::infinity());
  s.row_sum.head(count).setZero();
  const bool streamed = count <= pb.streamed_rows;

  for (index_t c0 = tile.keys.begin; c0 < tile.keys.end; c0 += pb.tiles.cols) {
    const index_t bc = std::min(pb.tiles.cols, tile.keys.end - c0);
    auto scores = s.scores.topLeftCorner(count, bc);  // (R, Bc)
    const auto softmax = [&](auto& block_scores) {
      for (index_t rho = 0; rho < count; ++rho) {
        const index_t i = pos.query(row_of(rho));
        const index_range visible = pos.visible_keys(layout.band, i, c0, bc);
        float* row = &block_scores(rho, 0);
        std::fill(row, row + visible.begin, 0.0f);
        if (!visible.empty())
          if (const float* slice = visible_row_bias(plan, pos, head_of(rho), i, c0, visible, row))
            add_values(slice, visible.size(), row + visible.begin);
        online_softmax_row(row + visible.begin, visible.size(), bc - visible.begin, s.row_max[rho], s.row_sum[rho], acc.row(rho));
      }
    };
    if (streamed) {
      streamed_block(pb, layout, tile, kv_head, c0, q, scores, acc, s, softmax);
    } else {
      scores.noalias() = pb.scale * (q * float_key_rows(pb.k, layout, tile.sequence, kv_head, c0, bc, s.k).transpose());
      softmax(scores);
      acc.noalias() += scores * float_key_rows(pb.v, layout, tile.sequence, kv_head, c0, bc, s.v);  // (R, Dv)
    }
  }

  for (index_t rho = 0; rho < count; ++rho) {
    const index_t h = head_of(rho), row = seq.q_begin + row_of(rho);
    float* lse = pb.lse.empty() ? nullptr : &pb.lse[std::size_t(pb.lse_index(b, h, row))];
    normalise_row(s.row_max[rho], s.row_sum[rho], acc.row(rho), pb.o.rows(b, h, row, 1).row(0), lse);
  }
}

template <class Q, class KV, class Plan>
void half_fused_forward(half_forward_problem<Q, KV> pb, const batch_layout& layout, const Plan& plan, int threads) {
  clear_rows_outside(pb, layout);
  // A group's query heads share one read of K and V: up to tiles.rows rows per item, like the float tile.
  pb.block_rows = std::max<index_t>(1, pb.tiles.rows / pb.group);
  const std::vector<query_tile> tiles = query_tiles(layout, pb.block_rows);  // most keys first
  pb.heads_per_item = index_t(tiles.size()) * pb.k.heads >= threads ? pb.group : 1;
  const index_t items_per_tile = pb.q.heads / pb.heads_per_item, count = pb.block_rows * pb.heads_per_item;
  auto make_scratch = [&] {
    half_forward_scratch s{row_matrix<float>(count, pb.q.dim), row_matrix<float>(pb.tiles.cols, pb.k.dim),
                           row_matrix<float>(pb.tiles.cols, pb.v.dim), row_matrix<float>(count, pb.tiles.cols),
                           row_matrix<float>(count, pb.v.dim), Eigen::ArrayXf(count), Eigen::ArrayXf(count), {}, {}};
    return s;
  };
  parallel_items(index_t(tiles.size()) * items_per_tile, thread_count(threads), make_scratch,
                 [&](index_t item, half_forward_scratch& s) {
                   const query_tile& tile = tiles[std::size_t(item / items_per_tile)];
                   half_forward_item(pb, plan, layout, tile, (item % items_per_tile) * pb.heads_per_item, s);
                 });
}

/// The 16-bit forward behind the public overloads (and the decode benchmark's float cache):
/// checks, then runs. Q and KV may be float.
template <bias_policy Bias, class Q, class KV>
void attention_storage(tensor_view<const Q> q, tensor_view<const KV> k, tensor_view<const KV> v, const Bias& bias,
                       const attention_options<float>& options, tensor_view<float> o, std::span<float> lse) {
  // Preconditions
  check_attention_call("relbias::attention", q, k, v, bias, options, o, lse);

  const batch_layout layout = make_layout(options, q.batch, q.seq, k.seq);
  const int threads = thread_count(options.num_threads);
  const auto plan = make_bias_plan(bias, visited_window(layout), threads);
  if constexpr (std::same_as<KV, Eigen::bfloat16>) {
    // The AMX kernel packs contiguous keys at start + row positions: paged caches and explicit
    // positions take the fp32 path.
    const bool contiguous = !options.paged && options.q_positions.empty() && options.k_positions.empty();
    if (options.compute == compute_precision::bf16 && contiguous && amx::usable()) {
      const bf16_forward_problem<Q> pb{q, k, v, o, lse, options.scale_for(q.dim), q.heads / k.heads};
      bf16_fused_forward(pb, layout, plan, threads);
      return;
    }
  }
  const half_forward_problem<Q, KV> pb{q, k, v, o, lse, options.scale_for(q.dim), q.heads / k.heads, 1, 1, {}};
  half_fused_forward(pb, layout, plan, threads);
}

}  // namespace detail

/// Fused forward over 16-bit storage (a bf16 or f16 KV cache): k [B, Lk, Hk, D] and v
/// [B, Lk, Hk, Dv] in Eigen::half or Eigen::bfloat16, q [B, Lq, Hq, D] in the same format or in
/// float; o [B, Lq, Hq, Dv] and lse (B * Hq * Lq values, [b][h][row], or empty) in float. The
/// bias policy is a float one. Every element is widened to float exactly on load and the kernel
/// computes in float, so O is attention() of the widened tensors up to float rounding; against
/// unrounded float inputs it differs by the format's rounding (unit_roundoff<T>(), README,
/// "Storage precision"). Everything else (shapes, strides, GQA, options, errors, rows that see no
/// key) is as for the float attention(). options.compute = compute_precision::bf16 with bfloat16
/// k and v multiplies in bf16 on AMX where the CPU has it (q rounded to bf16 if float, P to bf16;
/// the error bound is in docs/storage.md), and widens as above elsewhere.
template <bias_policy Bias, class Q, class K, class V>
  requires std::same_as<typename Bias::scalar_type, float> && half_attention_inputs<Q, K, V>
void attention(tensor_view<Q> q, tensor_view<K> k, tensor_view<V> v, const Bias& bias, const attention_options<float>& options,
               tensor_view<float> o, std::span<float> lse = {}) {
  using storage = std::remove_const_t<K>;
  detail::attention_storage<Bias, std::remove_const_t<Q>, storage>(q, k, v, bias, options, o, lse);
}

/// Fused forward over 16-bit storage returning owning float O and lse.
template <bias_policy Bias, class Q, class K, class V>
  requires std::same_as<typename Bias::scalar_type, float> && half_attention_inputs<Q, K, V>
attention_result<float> attention(tensor_view<Q> q, tensor_view<K> k, tensor_view<V> v, const Bias& bias,
                                  const attention_options<float>& options = {}) {
  using query = std::remove_const_t<Q>;
  using storage = std::remove_const_t<K>;
  detail::check_qkv("relbias::attention", tensor_view<const query>(q), tensor_view<const storage>(k), tensor_view<const storage>(v),
                    index_t(bias.num_heads()), options);
  detail::check_result_sizes<query, storage, float>("relbias::attention", q, v);
  attention_result<float> result{tensor<float>(q.batch, q.seq, q.heads, v.dim), std::vector<float>(std::size_t(q.batch * q.heads * q.seq))};
  detail::attention_storage<Bias, query, storage>(q, k, v, bias, options, result.out.view(), std::span<float>(result.lse));
  return result;
}

namespace detail {

/// A float copy of a view (relbias::convert: exact for 16-bit storage).
template <class T>
tensor<float> widened_copy(const tensor_view<const T>& t) {
  tensor<float> out(t.batch, t.seq, t.heads, t.dim);
  convert(t, out.view());
  return out;
}

/// The float backward on the widened tensors: the 16-bit backward wherever the bf16 AMX path
/// does not run. Its results are attention_backward() of the widened q, k, v, o and d_out, bit
/// for bit.
template <bias_policy Bias, class Q, class KV, class O, class DO>
void widened_backward(tensor_view<const Q> q, tensor_view<const KV> k, tensor_view<const KV> v, tensor_view<const O> o,
                      tensor_view<const DO> d_out, std::span<const float> lse, const Bias& bias, const attention_options<float>& options,
                      tensor_view<float> dq, tensor_view<float> dk, tensor_view<float> dv, std::span<float> bias_grad) {
  const tensor<float> qf = widened_copy(q), kf = widened_copy(k), vf = widened_copy(v), of = widened_copy(o), d_outf = widened_copy(d_out);
  relbias::attention_backward(qf.view(), kf.view(), vf.view(), of.view(), d_outf.view(), lse, bias, options, dq, dk, dv, bias_grad);
}

}  // namespace detail

/// The element types attention_backward() takes from 16-bit storage: q, k, v as for attention()
/// (half_attention_inputs), o and d_out each float or of the storage format.
template <class Q, class K, class V, class O, class D>
concept half_backward_inputs = half_attention_inputs<Q, K, V> && half_attention_inputs<O, K, V> && half_attention_inputs<D, K, V>;

/// Backward over 16-bit storage: q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] as for the
/// 16-bit attention() (k and v in Eigen::half or Eigen::bfloat16, q in that format or float), o
/// and d_out [B, Lq, Hq, Dv] each float (o as the 16-bit forward returns it) or in the storage
/// format; lse, dq, dk, dv and bias_grad in float, with the float attention_backward()'s
/// contract (dq, dk, dv overwritten, bias_grad accumulated into, the same checks and errors).
///
/// By default (compute_precision::fp32), and wherever the bf16 path does not run (no AMX, or
/// Eigen::half storage), the tensors are widened to float (exactly) and the float
/// attention_backward() runs: its results on the widened tensors, bit for bit, at the cost of
/// float copies of q, k, v, o and d_out. options.compute = compute_precision::bf16 with bfloat16
/// k and v runs the five products as bf16 tile products on AMX where the CPU has it (q, o, d_out
/// rounded to bf16 if float; P and dS rounded to bf16 where they feed a product; softmax, dS,
/// bias gradient and sums in float): the error bound is in docs/storage.md, and the gradients
/// are the same bits for any thread count.
template <bias_policy Bias, class Q, class K, class V, class O, class D>
  requires std::same_as<typename Bias::scalar_type, float> && half_backward_inputs<Q, K, V, O, D>
void attention_backward(tensor_view<Q> q, tensor_view<K> k, tensor_view<V> v, tensor_view<O> o, tensor_view<D> d_out,
                        std::span<const float> lse, const Bias& bias, const attention_options<float>& options, tensor_view<float> dq,
                        tensor_view<float> dk, tensor_view<float> dv, std::span<float> bias_grad = {}) {
  using query = std::remove_const_t<Q>;
  using storage = std::remove_const_t<K>;
  using output = std::remove_const_t<O>;
  using output_gradient = std::remove_const_t<D>;
  const tensor_view<const query> qc = q;
  const tensor_view<const storage> kc = k, vc = v;
  const tensor_view<const output> oc = o;
  const tensor_view<const output_gradient> d_outc = d_out;
  // Preconditions (on the caller's tensors: the widened copies would hide aliasing)
  detail::check_attention_backward_call("relbias::attention_backward", qc, kc, vc, oc, d_outc, lse, bias, options, dq, dk, dv,
                                        bias_grad);

  if constexpr (std::same_as<storage, Eigen::bfloat16>) {
    if (options.compute == compute_precision::bf16 && detail::amx::usable()) {
      const detail::bf16_backward_problem<query, output, output_gradient> pb{
          qc, kc, vc, oc, d_outc, lse, dq, dk, dv, options.scale_for(q.dim), q.heads / k.heads,
          detail::make_layout(options, q.batch, q.seq, k.seq)};
      detail::run_bf16_backward(pb, bias, bias_grad, detail::thread_count(options.num_threads));
      return;
    }
  }
  detail::widened_backward(qc, kc, vc, oc, d_outc, lse, bias, options, dq, dk, dv, bias_grad);
}

}  // namespace relbias

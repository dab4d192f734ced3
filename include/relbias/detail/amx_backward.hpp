#pragma once
// The bf16 backward on AMX (attention_options::compute = compute_precision::bf16 with bfloat16
// k and v, where detail/amx.hpp finds AMX): FlashAttention-2's recomputation, as the float
// attention_backward.hpp, with its five products as bf16 tile products accumulated in float:
//
//   S  = Q K^T            P  = exp(scale S + B + mask - lse)   (float)
//   dP = dO V^T           dS = P o (dP - D), D = rowsum(dO o O) (float; the bias gradient from it)
//   dV^T += dO^T bf16(P)  dK^T += Q^T bf16(dS)  dQ += bf16(dS) K   (scale applied once at the end)
//
// Q, K, V and dO enter the products in bf16 (q, o and d_out may be float: rounded to nearest
// even, as a float q in the forward), P and dS are rounded to bf16 where they feed a product;
// everything else (P itself, dS, D, the bias gradient, the accumulators) is float. The key-side
// products are computed transposed (dV^T = dO^T P), so that the A operands are dO^T and Q^T,
// packed once per work item, and P and dS only need their rows paired (amx::to_bf16_pairs) to
// become B operands: no transposition of P or dS.
//
// A work item is one (sequence, key/value head) with every query head of its group, as the
// float backward's: it packs its K and V (three tile layouts) and its heads' Q, dO, Q^T and dO^T
// once, then walks key tiles of 128 keys (outer, FA2: the float dK^T and dV^T of a tile stay in
// L2) and, per head, blocks of 128 query rows that see one of the tile's keys. dQ is summed in a
// float buffer of the item's rows. Items never split (unlike the float backward's slices), and
// each has its own bias-gradient partial, added into bias_grad in item order after its wave of
// 16 items ran (waves bound the partials held at once): the same inputs and CPU give the same
// bits for any thread count. A call with fewer items
// than threads (one sequence and one key/value head) runs on fewer threads.

#include "relbias/attention_backward.hpp"
#include "relbias/detail/amx.hpp"
#include "relbias/detail/amx_forward.hpp"
#include "relbias/detail/bias_gradient.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <vector>

namespace relbias::detail {

inline constexpr index_t bf16_backward_keys = 128;  // keys per key tile: dK^T and dV^T (D x 128 floats each) stay in L2
inline constexpr index_t bf16_backward_wave = 16;   // items per wave: bias-gradient partials alive at once
inline constexpr index_t bf16_backward_rows = 128;  // query rows per block: four 32-row strips, the depth of dK^T and dV^T (1.1x 64)

/// Everything one bf16 backward call shares across work items. Q, O and DO: float or bfloat16.
template <class Q, class O, class DO>
struct bf16_backward_problem {
  tensor_view<const Q> q;
  tensor_view<const Eigen::bfloat16> k, v;
  tensor_view<const O> o;
  tensor_view<const DO> d_out;
  std::span<const float> lse;
  tensor_view<float> dq, dk, dv;
  float scale;
  index_t group;  // query heads per key/value head
  batch_layout layout;

  index_t lse_index(index_t b, index_t h, index_t row) const { return (b * q.heads + h) * q.seq + row; }
};

/// Padded sizes of one item: queries to 32 (two A-tile halves), D and Dv to 32 (the depth of a
/// Q K^T or dO V^T step, and the rows of dK^T and dV^T), D also to 16 (dQ's column tiles).
struct bf16_backward_sizes {
  index_t q_pad, k_pad, dim_pad, dim_v_pad, dim_q16;
  index_t t_stride;  // q_pad + 32: the rows of Q^T and dO^T, not a multiple of 4 KiB apart (L1 set conflicts)
};

struct bf16_backward_scratch {
  line_vector<std::uint16_t> keys;       // K for S = Q K^T: 16-key blocks of dim_pad / 2 pair rows (pack_keys)
  line_vector<std::uint16_t> values;     // V for dP = dO V^T, the same layout over Dv
  line_vector<std::uint16_t> key_rows;   // K for dQ = dS K: 32-key chunks of 16 pair rows (pack_values)
  line_vector<std::uint16_t> q, d_out;   // per head of the group: (q_pad, dim_pad), (q_pad, dim_v_pad)
  line_vector<std::uint16_t> q_t, d_out_t;  // per head: (dim_pad, t_stride), (dim_v_pad, t_stride): the A operands of dK^T, dV^T
  line_vector<float> dq;                 // per head: (q_pad, dim_q16), the sum of dS K
  line_vector<float> dk_t, dv_t;         // (dim_pad, 128), (dim_v_pad, 128): one key tile's sums
  line_vector<float> scores, d_scores;   // (128, 128): S then P; dP then dS
  line_vector<std::uint16_t> ds;         // (128, 128): bf16 dS, row-major (the A operand of dQ)
  line_vector<std::uint16_t> p_pairs, ds_pairs;  // (64, 2 * 128): bf16 P and dS, rows paired (B operands)
  std::vector<float> delta;              // per head: (q_length) rows' D = rowsum(dO o O)
};

template <class T>
float as_float(T x) noexcept {
  return static_cast<float>(x);
}

/// out (cols, rows; rows out_stride apart) = the transpose of in (rows, cols), row-major, rows a
/// multiple of 16: in blocks of 16 rows, so that each output row gets 32 contiguous bytes per
/// block and the block's input stays in L1 (element by element, the scattered stores cost a tenth
/// of the backward).
inline void transpose_rows(const std::uint16_t* in, index_t rows, index_t cols, std::uint16_t* out, index_t out_stride) {
  for (index_t r0 = 0; r0 < rows; r0 += 16)
    for (index_t c = 0; c < cols; ++c)
      for (index_t r = r0; r < r0 + 16; ++r) out[c * out_stride + r] = in[r * cols + c];
}

/// Packs the item's K and V (zeros past k_length) and its heads' Q, dO (rows and transposed;
/// zeros past q_length and D, Dv), and each row's D; clears the dQ sums.
template <class Q, class O, class DO>
void pack_backward_item(const bf16_backward_problem<Q, O, DO>& pb, const sequence& seq, index_t kv_head, const bf16_backward_sizes& z,
                        bf16_backward_scratch& s) {
  const index_t b = seq.batch, group = pb.group, dim = pb.q.dim, dim_v = pb.v.dim;
  s.keys.assign(std::size_t(z.k_pad * z.dim_pad), 0);
  s.values.assign(std::size_t(z.k_pad * z.dim_v_pad), 0);
  s.key_rows.assign(std::size_t(z.k_pad * z.dim_q16), 0);
  if (seq.k_length > 0) {
    const Eigen::bfloat16* k = pb.k.row(b, seq.k_begin, kv_head);
    pack_keys(k, pb.k.seq_stride, seq.k_length, dim, z.dim_pad, s.keys.data());
    pack_keys(pb.v.row(b, seq.k_begin, kv_head), pb.v.seq_stride, seq.k_length, dim_v, z.dim_v_pad, s.values.data());
    pack_values(k, pb.k.seq_stride, seq.k_length, dim, z.dim_q16, s.key_rows.data());
  }
  s.q.assign(std::size_t(group * z.q_pad * z.dim_pad), 0);
  s.d_out.assign(std::size_t(group * z.q_pad * z.dim_v_pad), 0);
  s.q_t.resize(std::size_t(group * z.dim_pad * z.t_stride));  // columns < q_pad written by transpose_rows, no more read
  s.d_out_t.resize(std::size_t(group * z.dim_v_pad * z.t_stride));
  s.dq.assign(std::size_t(group * z.q_pad * z.dim_q16), 0.0f);
  s.delta.assign(std::size_t(group * seq.q_length), 0.0f);
  for (index_t g = 0; g < group; ++g) {
    const index_t h = kv_head * group + g;
    std::uint16_t* q = s.q.data() + g * z.q_pad * z.dim_pad;
    std::uint16_t* d_out = s.d_out.data() + g * z.q_pad * z.dim_v_pad;
    std::uint16_t* q_t = s.q_t.data() + g * z.dim_pad * z.t_stride;
    std::uint16_t* d_out_t = s.d_out_t.data() + g * z.dim_v_pad * z.t_stride;
    for (index_t r = 0; r < seq.q_length; ++r) {
      const Q* q_row = pb.q.row(b, seq.q_begin + r, h);
      const O* o_row = pb.o.row(b, seq.q_begin + r, h);
      const DO* d_out_row = pb.d_out.row(b, seq.q_begin + r, h);
      for (index_t d = 0; d < dim; ++d) q[r * z.dim_pad + d] = bf16_bits(q_row[d]);
      float delta = 0;
      for (index_t d = 0; d < dim_v; ++d) {
        d_out[r * z.dim_v_pad + d] = bf16_bits(d_out_row[d]);
        delta += as_float(o_row[d]) * as_float(d_out_row[d]);
      }
      s.delta[std::size_t(g * seq.q_length + r)] = delta;
    }
    transpose_rows(q, z.q_pad, z.dim_pad, q_t, z.t_stride);
    transpose_rows(d_out, z.q_pad, z.dim_v_pad, d_out_t, z.t_stride);
  }
}

/// P and dS of one row of a block (query row `row` of the sequence; rows past it: zeros) against
/// the key tile at position j0 (bc keys, bc_pad columns): P = exp(scale S + bias - lse) over the
/// visible keys, dS = P o (dP - delta) there, zeros elsewhere (also in a NaN row, as the float
/// backward); the float dS goes to the bias gradient. p holds S and ds holds dP on entry.
template <class Q, class O, class DO, class Plan, class Accumulator>
void bf16_backward_row(const bf16_backward_problem<Q, O, DO>& pb, const Plan& plan, Accumulator* bias_grad, const sequence& seq,
                       index_t h, index_t row, float delta, index_t j0, index_t bc, index_t bc_pad, float* p, float* ds) {
  index_range visible{};
  float lse = 0;
  if (row < seq.q_length) {
    lse = pb.lse[std::size_t(pb.lse_index(seq.batch, h, seq.q_begin + row))];
    if (lse != -std::numeric_limits<float>::infinity()) visible = pb.layout.band.visible_keys(query_position(seq.q_start, row), j0, bc);
  }
  if (visible.empty()) {
    std::fill(p, p + bc_pad, 0.0f);
    std::fill(ds, ds + bc_pad, 0.0f);
    return;
  }
  for (float* x : {p, ds}) {
    std::fill(x, x + visible.begin, 0.0f);
    std::fill(x + visible.end, x + bc_pad, 0.0f);
  }
  const index_t i = query_position(seq.q_start, row), n = visible.size();
  float* x = p + visible.begin;
  if constexpr (std::same_as<Plan, empty_plan<float>>) {
    amx::probabilities_and_gradient(x, ds + visible.begin, n, pb.scale, nullptr, lse, delta);
  } else if (const float* bias = plan_row<float>(plan, h, i, j0 + visible.begin)) {
    amx::probabilities_and_gradient(x, ds + visible.begin, n, pb.scale, bias, lse, delta);
  } else {  // FIRE's plan, a policy's own: it adds to scaled scores
    amx::scale_bias_max(x, n, pb.scale, nullptr);
    plan.add_row(h, i, j0 + visible.begin, n, x);
    amx::probabilities_and_gradient(x, ds + visible.begin, n, 1.0f, nullptr, lse, delta);
  }
  if (bias_grad) bias_grad->add_row(h, i, j0 + visible.begin, n, ds + visible.begin);
}

/// One block: rows [r0, r0 + rows) of head g of the item (r0 a multiple of 32) against the key
/// tile at column c0 (a multiple of 32; bc keys): the five products and the row pass.
template <class Q, class O, class DO, class Plan, class Accumulator>
void bf16_backward_block(const bf16_backward_problem<Q, O, DO>& pb, const Plan& plan, Accumulator* bias_grad, const sequence& seq,
                         index_t kv_head, index_t g, index_t r0, index_t rows, index_t c0, index_t bc, const bf16_backward_sizes& z,
                         bf16_backward_scratch& s) {
  constexpr index_t ld = bf16_backward_keys;
  const index_t h = kv_head * pb.group + g, bc_pad = round_up(bc, 32), rows_pad = round_up(rows, 32);
  const index_t chunks = bc_pad / 32, strips = rows_pad / 32, j0 = key_position(seq.k_start, c0);
  const std::uint16_t* q = s.q.data() + g * z.q_pad * z.dim_pad;
  const std::uint16_t* d_out = s.d_out.data() + g * z.q_pad * z.dim_v_pad;
  for (index_t t = 0; t < strips; ++t) {
    const index_t r = r0 + 32 * t;
    amx::scores(q + r * z.dim_pad, z.dim_pad, s.keys.data() + c0 * z.dim_pad, z.dim_pad / 32, chunks, s.scores.data() + 32 * t * ld, ld);
    amx::scores(d_out + r * z.dim_v_pad, z.dim_v_pad, s.values.data() + c0 * z.dim_v_pad, z.dim_v_pad / 32, chunks,
                s.d_scores.data() + 32 * t * ld, ld);  // dP = dO V^T: V packed as keys over Dv
  }
  for (index_t r = 0; r < rows_pad; ++r) {
    const index_t row = r0 + r;
    const float delta = row < seq.q_length ? s.delta[std::size_t(g * seq.q_length + row)] : 0.0f;
    float* p = s.scores.data() + r * ld;
    float* ds = s.d_scores.data() + r * ld;
    bf16_backward_row(pb, plan, bias_grad, seq, h, row, delta, j0, bc, bc_pad, p, ds);
    if (r % 2) {  // rows r - 1 and r become pair row (r - 1) / 2; dS also as rows
      amx::to_bf16_pairs(p - ld, p, bc_pad, s.p_pairs.data() + (r / 2) * 2 * bc_pad);
      amx::to_bf16_pairs(ds - ld, ds, bc_pad, s.ds_pairs.data() + (r / 2) * 2 * bc_pad, s.ds.data() + (r - 1) * ld, s.ds.data() + r * ld);
    }
  }
  const index_t tiles = bc_pad / 16;
  const std::uint16_t* q_t = s.q_t.data() + g * z.dim_pad * z.t_stride + r0;
  const std::uint16_t* d_out_t = s.d_out_t.data() + g * z.dim_v_pad * z.t_stride + r0;
  for (index_t d = 0; d < z.dim_v_pad; d += 32)  // dV^T += dO^T P
    amx::values(d_out_t + d * z.t_stride, z.t_stride, s.p_pairs.data(), tiles, 0, tiles, strips, 2, s.dv_t.data() + d * ld, ld);
  for (index_t d = 0; d < z.dim_pad; d += 32)  // dK^T += Q^T dS
    amx::values(q_t + d * z.t_stride, z.t_stride, s.ds_pairs.data(), tiles, 0, tiles, strips, 2, s.dk_t.data() + d * ld, ld);
  float* dq = s.dq.data() + (g * z.q_pad + r0) * z.dim_q16;
  for (index_t t = 0; t < strips; ++t)  // dQ += dS K
    amx::values(s.ds.data() + 32 * t * ld, ld, s.key_rows.data() + c0 * z.dim_q16, z.dim_q16 / 16, 0, z.dim_q16 / 16, chunks, 2,
                dq + 32 * t * z.dim_q16, z.dim_q16);
}

/// One work item: sequence `seq`, key/value head kv_head, every query head of its group.
template <class Q, class O, class DO, class Plan, class Accumulator>
void bf16_backward_item(const bf16_backward_problem<Q, O, DO>& pb, const Plan& plan, Accumulator* bias_grad, const sequence& seq,
                        index_t kv_head, bf16_backward_scratch& s) {
  const index_t b = seq.batch, dim = pb.q.dim, dim_v = pb.v.dim;
  const bf16_backward_sizes z{round_up(seq.q_length, 32), round_up(seq.k_length, 32), round_up(dim, 32), round_up(dim_v, 32),
                              round_up(dim, 16), round_up(seq.q_length, 32) + 32};
  for (index_t r = 0; r < seq.k_length; ++r) {  // keys no query sees keep dK = dV = 0
    std::fill(pb.dk.row(b, seq.k_begin + r, kv_head), pb.dk.row(b, seq.k_begin + r, kv_head) + dim, 0.0f);
    std::fill(pb.dv.row(b, seq.k_begin + r, kv_head), pb.dv.row(b, seq.k_begin + r, kv_head) + dim_v, 0.0f);
  }
  pack_backward_item(pb, seq, kv_head, z, s);
  constexpr index_t ld = bf16_backward_keys;
  const index_range keys = visible_key_columns(pb.layout.band, seq, 0, seq.q_length);
  amx::configure();
  for (index_t c0 = keys.begin / 32 * 32; c0 < keys.end; c0 += ld) {  // 32-aligned: the packed key blocks
    const index_t bc = std::min(ld, keys.end - c0), j0 = key_position(seq.k_start, c0);
    std::fill(s.dk_t.begin(), s.dk_t.end(), 0.0f);
    std::fill(s.dv_t.begin(), s.dv_t.end(), 0.0f);
    const index_range rows = pb.layout.band.queries_seeing(seq.q_start, seq.q_length, j0, j0 + bc - 1);
    for (index_t g = 0; g < pb.group; ++g)
      for (index_t r0 = rows.begin / 32 * 32; r0 < rows.end; r0 += bf16_backward_rows)  // 32-aligned: the packed query rows
        bf16_backward_block(pb, plan, bias_grad, seq, kv_head, g, r0, std::min(bf16_backward_rows, rows.end - r0), c0, bc, z, s);
    for (index_t c = 0; c < bc; ++c) {
      float* dk = pb.dk.row(b, seq.k_begin + c0 + c, kv_head);
      float* dv = pb.dv.row(b, seq.k_begin + c0 + c, kv_head);
      for (index_t d = 0; d < dim; ++d) dk[d] = pb.scale * s.dk_t[std::size_t(d * ld + c)];
      for (index_t d = 0; d < dim_v; ++d) dv[d] = s.dv_t[std::size_t(d * ld + c)];
    }
  }
  amx::release();
  for (index_t g = 0; g < pb.group; ++g)
    for (index_t r = 0; r < seq.q_length; ++r) {
      float* dq = pb.dq.row(b, seq.q_begin + r, kv_head * pb.group + g);
      const float* sum = s.dq.data() + (g * z.q_pad + r) * z.dim_q16;
      for (index_t d = 0; d < dim; ++d) dq[d] = pb.scale * sum[d];
    }
}

/// The bf16 backward of a checked call: rows outside every sequence cleared, then every
/// (sequence, key/value head) item, each with its own bias-gradient partial, added into
/// bias_grad in item order after its wave.
template <class Q, class O, class DO, class Plan, class MakeAccumulator>
void bf16_fused_backward(const bf16_backward_problem<Q, O, DO>& pb, const Plan& plan, MakeAccumulator make_accumulator,
                         std::span<float> bias_grad, int threads) {
  for_each_row_outside(pb.layout, pb.q.batch, pb.q.seq, true, [&](index_t b, index_t r) { zero_row(pb.dq, b, r); });
  for_each_row_outside(pb.layout, pb.k.batch, pb.k.seq, false, [&](index_t b, index_t r) {
    zero_row(pb.dk, b, r);
    zero_row(pb.dv, b, r);
  });
  const index_t heads = pb.k.heads, items = index_t(pb.layout.sequences.size()) * heads;
  using accumulator = decltype(make_accumulator());
  std::vector<std::optional<accumulator>> partials(static_cast<std::size_t>(bf16_backward_wave));
  const index_t dim_pad = round_up(pb.q.dim, 32), dim_v_pad = round_up(pb.v.dim, 32);
  auto make_scratch = [&] {
    bf16_backward_scratch s;
    constexpr auto block = std::size_t(bf16_backward_rows * bf16_backward_keys);
    s.dk_t.resize(std::size_t(dim_pad * bf16_backward_keys));
    s.dv_t.resize(std::size_t(dim_v_pad * bf16_backward_keys));
    s.scores.resize(block);
    s.d_scores.resize(block);
    s.ds.resize(block);
    s.p_pairs.resize(block);
    s.ds_pairs.resize(block);
    return s;
  };
  // Waves of a fixed number of items (not of threads: the bits must not depend on them) bound
  // the partials alive at once (a T5 partial holds every head's offsets).
  for (index_t first = 0; first < items; first += bf16_backward_wave) {
    const index_t count = std::min(bf16_backward_wave, items - first);
    parallel_items(count, threads, make_scratch, [&](index_t n, bf16_backward_scratch& s) {
      const index_t item = first + n;
      auto& partial = partials[std::size_t(n)];
      if (!bias_grad.empty()) partial.emplace(make_accumulator());
      bf16_backward_item(pb, plan, partial ? &*partial : nullptr, pb.layout.sequences[std::size_t(item / heads)], item % heads, s);
    });
    for (auto& partial : partials)
      if (partial) {
        partial->finish(bias_grad);
        partial.reset();
      }
  }
}

/// Builds the bias plan and the gradient accumulators for the policy, then runs the pass.
template <class Q, class O, class DO, bias_policy Bias>
void run_bf16_backward(const bf16_backward_problem<Q, O, DO>& pb, const Bias& bias, std::span<float> bias_grad, int threads) {
  const position_window window = visited_window(pb.layout);
  const auto plan = make_bias_plan(bias, window, threads);
  if constexpr (differentiable_bias<Bias>) {
    bf16_fused_backward(pb, plan, [&] { return make_gradient_accumulator(bias, window); }, bias_grad, threads);
  } else {
    bf16_fused_backward(pb, plan, [] { return no_gradient_accumulator<float>{}; }, bias_grad, threads);
  }
}

}  // namespace relbias::detail

#pragma once
// Fused attention backward: FlashAttention-2's recomputation scheme (Dao 2023). Scores and
// probabilities are rebuilt tile by tile from Q, K and the saved row log-sum-exp; no (Lq, Lk)
// matrix is ever held. Per tile (Br queries, Bc keys):
//   P  = exp(scale Q K^T + B + mask - lse)      dV += P^T dO
//   dP = dO V^T      dS = P o (dP - rowsum(dO o O))
//   dQ += scale dS K      dK += scale dS^T Q      bias gradient <- dS
//
// Only the tiles the forward visits are visited: per key tile, the query rows that see one of
// its keys (sequences.hpp); padding, other packed sequences and keys outside a sliding window
// never are.
//
// Determinism: a work item is one (sequence, key/value head) with every query head of its group,
// so it owns its rows of dQ, dK and dV outright (GQA sums over the group inside the item, in a
// fixed order). With fewer such groups than threads (multi-query attention at batch 1) a group's
// query heads are split into slices, each summing dK and dV into a buffer of its own; the buffers
// are added in slice order afterwards. Items go to threads in a static round-robin, bias-gradient
// partials are kept per thread and summed in thread order: the same inputs and thread count give
// bit-identical gradients. No atomics.

#include "relbias/attention.hpp"
#include "relbias/attention_options.hpp"
#include "relbias/concepts.hpp"
#include "relbias/detail/bias_gradient.hpp"
#include "relbias/detail/bias_plan.hpp"
#include "relbias/detail/checks.hpp"
#include "relbias/detail/layout.hpp"
#include "relbias/detail/microkernel.hpp"
#include "relbias/detail/parallel.hpp"
#include "relbias/tensor.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <vector>

namespace relbias {

namespace detail {

template <class S>
struct backward_problem {
  tensor_view<const S> q, k, v, o, d_out;
  std::span<const S> lse;
  tensor_view<S> dq, dk, dv;
  attention_options<S> options;
  S scale;
  index_t group;
  // 128 x 256: each pass over a key tile's query rows reads Q, dO and dQ once for 256 keys;
  // against 64 x 128 the no-bias backward ran 1.15x faster on 2 threads (L = 4096, d = 64).
  tile_shape tiles{.rows = 128, .cols = 256};
  std::vector<S> row_delta{};  // [b][h][row]: rowsum(dO o O), the softmax backward's correction
  batch_layout layout{};       // set by run_backward

  index_t lse_index(index_t b, index_t h, index_t r) const { return (b * q.heads + h) * q.seq + r; }
};

/// What one work item computes: for one sequence and key/value head kv_head, the query heads
/// first_head, first_head + head_step, ... of the group, with dK and dV summed into dk and dv
/// (single-head views of the sequence's key rows: the user's tensors, or the slice's buffers).
template <class S>
struct backward_work {
  const sequence* seq;
  index_t kv_head, first_head, head_step;
  tensor_view<S> dk, dv;
};

/// Head h of batch b of t as a [1, seq, 1, dim] view of the same memory.
template <class S>
tensor_view<S> single_head(const tensor_view<S>& t, index_t b, index_t h) {
  return {t.row(b, 0, h), 1, t.seq, 1, t.dim, 0, t.seq_stride, 0};
}

template <class S>
struct backward_scratch {
  row_matrix<S> keys;             // (D, Bc padded): the key tile, transposed (packed once per key tile)
  row_matrix<S> values;           // (Dv, Bc padded): the value tile, transposed
  // The B operands read row by row, copied contiguous: rows of the user's tensors lie a row of
  // all heads apart (2 KiB at 8 heads, d = 64), so a micro-kernel panel of them falls into a few
  // L1 sets and streams from L2 (the backward ran at 0.53 of the one-thread peak on Intel).
  row_matrix<S> key_rows;         // (Bc, D): the key tile (packed once per key tile)
  row_matrix<S> queries;          // (Br, D): the query tile
  row_matrix<S> d_out;            // (Br, Dv): the tile's rows of dO
  row_matrix<S> probabilities;    // (Br, Bc padded): P, then dS
  row_matrix<S> d_probabilities;  // (Br, Bc padded): dP
};

template <class S>
std::vector<S> output_row_deltas(const tensor_view<const S>& o, const tensor_view<const S>& d_out) {
  std::vector<S> delta(std::size_t(o.batch * o.heads * o.seq));
  for (index_t b = 0; b < o.batch; ++b)
    for (index_t h = 0; h < o.heads; ++h)
      for (index_t r = 0; r < o.seq; ++r)
        delta[std::size_t((b * o.heads + h) * o.seq + r)] =
            (o.rows(b, h, r, 1).array() * d_out.rows(b, h, r, 1).array()).sum();
  return delta;
}

/// The columns of a tile (Bc keys from position j0) that query i sees: none when the row sees
/// no key at all (lse = -inf).
template <class S>
index_range row_keys(const backward_problem<S>& pb, S lse, index_t i, index_t j0, index_t bc) {
  if (lse == -std::numeric_limits<S>::infinity()) return {};
  return pb.layout.band.visible_keys(i, j0, bc);
}

/// Rebuilds P for a (Br, Bc) tile in place: exp(score + bias - lse) over each row's visible
/// columns, exact zeros elsewhere (as in the forward).
template <class S, class Plan, class Tile>
void recompute_probabilities(const backward_problem<S>& pb, const Plan& plan, Tile& p, const sequence& seq, index_t h,
                             index_t r0, index_t j0) {
  for (index_t r = 0; r < p.rows(); ++r) {
    const index_t i = query_position(seq.q_start, r0 + r);
    const S lse = pb.lse[std::size_t(pb.lse_index(seq.batch, h, seq.q_begin + r0 + r))];
    S* row = &p(r, 0);
    const index_range visible = row_keys(pb, lse, i, j0, p.cols());
    std::fill(row, row + visible.begin, S(0));
    std::fill(row + visible.end, row + p.cols(), S(0));
    if (visible.empty()) continue;  // no bias read: the row's offsets may lie outside the plan's window
    plan.add_row(h, i, j0 + visible.begin, visible.size(), row + visible.begin);
    exp_shifted_sum(row + visible.begin, visible.size(), lse);  // the forward's exp (the sum unused)
  }
}

/// One (query tile, key tile) pair of one query head of a sequence (rows r0.., columns c0..
/// relative to its first query and key): every product of the backward pass.
template <class S, class Plan, class Accumulator>
void backward_tile(const backward_problem<S>& pb, const Plan& plan, Accumulator* bias_grad, backward_scratch<S>& s,
                   const backward_work<S>& work, index_t h, index_t r0, index_t br, index_t c0, index_t bc) {
  const sequence& seq = *work.seq;
  const index_t b = seq.batch, first_row = seq.q_begin + r0;
  const index_t j0 = key_position(seq.k_start, c0);
  const index_t dim = pb.q.dim, dim_v = pb.v.dim, ld = s.probabilities.cols();
  const index_t ld_q = s.queries.cols(), ld_d_out = s.d_out.cols(), ld_k = s.key_rows.cols();
  pack_rows(pb.q.row(b, first_row, h), pb.q.seq_stride, br, dim, s.queries.data(), ld_q);
  pack_rows(pb.d_out.row(b, first_row, h), pb.d_out.seq_stride, br, dim_v, s.d_out.data(), ld_d_out);
  const S* q_tile = s.queries.data();      // (Br, D)
  const S* d_out_tile = s.d_out.data();    // (Br, Dv)
  const S* k_tile = s.key_rows.data();     // (Bc, D)
  const row_block<S> dq{pb.dq.row(b, first_row, h), pb.dq.seq_stride}, dk{work.dk.row(0, c0, 0), work.dk.seq_stride},
      dv{work.dv.row(0, c0, 0), work.dv.seq_stride};

  auto p = s.probabilities.topLeftCorner(br, bc);     // (Br, Bc)
  auto dp = s.d_probabilities.topLeftCorner(br, bc);  // (Br, Bc)
  // P^T and dS^T (the A operands of the key-side products) are P and dS read down their columns.
  block_product<S>(br, bc, dim, {q_tile, ld_q, 1}, {s.keys.data(), s.keys.cols()}, {p.data(), ld}, pb.scale, false);
  recompute_probabilities(pb, plan, p, seq, h, r0, j0);
  block_product<S>(bc, dim_v, br, {p.data(), 1, ld}, {d_out_tile, ld_d_out}, dv, S(1), true);  // dV += P^T dO
  block_product<S>(br, bc, dim_v, {d_out_tile, ld_d_out, 1}, {s.values.data(), s.values.cols()}, {dp.data(), ld}, S(1),
                   false);  // dP = dO V^T
  for (index_t r = 0; r < br; ++r) {  // dS = P o (dP - delta) over the visible keys, written over P
    const std::size_t row = std::size_t(pb.lse_index(b, h, first_row + r));
    const index_t i = query_position(seq.q_start, r0 + r);
    const index_range visible = row_keys(pb, pb.lse[row], i, j0, bc);  // hidden keys keep dS = 0, even in a NaN row
    p.row(r).segment(visible.begin, visible.size()).array() *=
        dp.row(r).segment(visible.begin, visible.size()).array() - pb.row_delta[row];
    if (bias_grad && !visible.empty()) bias_grad->add_row(h, i, j0 + visible.begin, visible.size(), &p(r, visible.begin));
  }
  block_product<S>(br, dim, bc, {p.data(), ld, 1}, {k_tile, ld_k}, dq, pb.scale, true);     // dQ += scale dS K
  block_product<S>(bc, dim, br, {p.data(), 1, ld}, {q_tile, ld_q}, dk, pb.scale, true);     // dK += scale dS^T Q
}

/// One work item. Key tiles outer (FA2), so the dK and dV tiles stay hot while the query tiles
/// stream past; per key tile only the query rows that see one of its keys.
template <class S, class Plan, class Accumulator>
void backward_item(const backward_problem<S>& pb, const Plan& plan, Accumulator* bias_grad, backward_scratch<S>& s,
                   const backward_work<S>& work) {
  const sequence& seq = *work.seq;
  const index_t head_end = (work.kv_head + 1) * pb.group;
  work.dk.matrix(0, 0).setZero();
  work.dv.matrix(0, 0).setZero();
  for (index_t h = work.first_head; h < head_end; h += work.head_step) pb.dq.rows(seq.batch, h, seq.q_begin, seq.q_length).setZero();

  const index_range keys = visible_key_columns(pb.layout.band, seq, 0, seq.q_length);
  for (index_t c0 = keys.begin; c0 < keys.end; c0 += pb.tiles.cols) {
    const index_t bc = std::min(pb.tiles.cols, keys.end - c0);
    const index_t j0 = key_position(seq.k_start, c0);
    const index_range rows = pb.layout.band.queries_seeing(seq.q_start, seq.q_length, j0, j0 + bc - 1);
    pack_transposed(pb.k.row(seq.batch, seq.k_begin + c0, work.kv_head), pb.k.seq_stride, bc, pb.k.dim, s.keys.data(), s.keys.cols());
    pack_rows(pb.k.row(seq.batch, seq.k_begin + c0, work.kv_head), pb.k.seq_stride, bc, pb.k.dim, s.key_rows.data(),
              s.key_rows.cols());
    pack_transposed(pb.v.row(seq.batch, seq.k_begin + c0, work.kv_head), pb.v.seq_stride, bc, pb.v.dim, s.values.data(),
                    s.values.cols());
    for (index_t h = work.first_head; h < head_end; h += work.head_step)
      for (index_t r0 = rows.begin; r0 < rows.end; r0 += pb.tiles.rows)
        backward_tile(pb, plan, bias_grad, s, work, h, r0, std::min(pb.tiles.rows, rows.end - r0), c0, bc);
  }
}

/// The work items of a pass: every (sequence, key/value head) group, each split into `slices`
/// slices of its query heads when there are fewer groups than threads. Slice 0 sums dK and dV
/// into the user's tensors, slice n > 0 into buffers of its own (the sequence's key rows x
/// (D + Dv) each, at most one per extra thread), which finish() adds in slice order.
template <class S>
class backward_split {
 public:
  backward_split(const backward_problem<S>& pb, int threads)
      : pb_(pb), groups_(index_t(pb.layout.sequences.size()) * pb.k.heads),
        slices_(std::clamp<index_t>(threads / std::max<index_t>(groups_, 1), 1, pb.group)),
        threads_(int(std::clamp<index_t>(groups_ * slices_, 1, threads))) {
    for (index_t group = 0; group < groups_; ++group)
      for (index_t n = 1; n < slices_; ++n) {
        const index_t keys = sequence_of(group).k_length;
        dk_parts_.emplace_back(1, keys, 1, pb.k.dim);
        dv_parts_.emplace_back(1, keys, 1, pb.v.dim);
      }
  }

  index_t items() const { return groups_ * slices_; }
  int threads() const { return threads_; }

  backward_work<S> item(index_t n) {
    const index_t group = n / slices_, slice = n % slices_;
    const index_t kv_head = group % pb_.k.heads;
    backward_work<S> work{&sequence_of(group), kv_head, kv_head * pb_.group + slice, slices_, of_group(pb_.dk, group),
                          of_group(pb_.dv, group)};
    if (slice > 0) {  // parts are ordered by group, then slice
      const auto part = std::size_t(group * (slices_ - 1) + slice - 1);
      work.dk = dk_parts_[part].view();
      work.dv = dv_parts_[part].view();
    }
    return work;
  }

  void finish() {
    for (std::size_t part = 0; part < dk_parts_.size(); ++part) {
      const index_t group = index_t(part) / (slices_ - 1);
      of_group(pb_.dk, group).matrix(0, 0) += dk_parts_[part].view().matrix(0, 0);
      of_group(pb_.dv, group).matrix(0, 0) += dv_parts_[part].view().matrix(0, 0);
    }
  }

 private:
  const sequence& sequence_of(index_t group) const { return pb_.layout.sequences[std::size_t(group / pb_.k.heads)]; }
  /// The group's key rows of one head of t, as a [1, k_length, 1, dim] view.
  tensor_view<S> of_group(const tensor_view<S>& t, index_t group) const {
    const sequence& seq = sequence_of(group);
    return single_head(t, seq.batch, group % pb_.k.heads).positions(seq.k_begin, seq.k_length);
  }

  const backward_problem<S>& pb_;
  index_t groups_, slices_;
  int threads_;
  std::vector<tensor<S>> dk_parts_, dv_parts_;
};

/// Runs the items on `threads` threads, item n on thread n % threads (static, so the order in
/// which each thread's bias-gradient partial sees rows is fixed), then sums the partials in
/// thread order into grad.
template <class S, class Plan, class MakeAccumulator>
void fused_backward(const backward_problem<S>& pb, const Plan& plan, MakeAccumulator make_accumulator,
                    std::span<S> grad) {
  backward_split<S> split(pb, thread_count(pb.options.num_threads));
  const index_t items = split.items();
  const int threads = split.threads();
  using accumulator = decltype(make_accumulator());
  std::vector<std::optional<accumulator>> partials(static_cast<std::size_t>(threads));
  parallel_items(
      threads, threads,
      [&] {
        backward_scratch<S> s;
        const index_t cols = padded_to_line<S>(pb.tiles.cols);
        s.keys.resize(pb.k.dim, cols);
        s.values.resize(pb.v.dim, cols);
        s.key_rows.resize(pb.tiles.cols, padded_to_line<S>(pb.k.dim));
        s.queries.resize(pb.tiles.rows, padded_to_line<S>(pb.q.dim));
        s.d_out.resize(pb.tiles.rows, padded_to_line<S>(pb.v.dim));
        s.probabilities.resize(pb.tiles.rows, cols);
        s.d_probabilities.resize(pb.tiles.rows, cols);
        return s;
      },
      [&](index_t thread, backward_scratch<S>& s) {
        auto& partial = partials[std::size_t(thread)];
        if (!grad.empty()) partial.emplace(make_accumulator());
        for (index_t item = thread; item < items; item += threads)
          backward_item(pb, plan, partial ? &*partial : nullptr, s, split.item(item));
      });
  split.finish();
  for (auto& partial : partials)
    if (partial) partial->finish(grad);
}

/// Rows outside every sequence (padding) pass no gradient: dQ, dK and dV are 0 there.
template <class S>
void clear_rows_outside(const backward_problem<S>& pb) {
  for_each_row_outside(pb.layout, pb.q.batch, pb.q.seq, true, [&](index_t b, index_t r) { zero_row(pb.dq, b, r); });
  for_each_row_outside(pb.layout, pb.k.batch, pb.k.seq, false, [&](index_t b, index_t r) {
    zero_row(pb.dk, b, r);
    zero_row(pb.dv, b, r);
  });
}

/// Builds the bias plan and the gradient accumulators for the policy, then runs the pass.
template <class S, bias_policy Bias>
void run_backward(backward_problem<S>& pb, const Bias& bias, std::span<S> bias_grad) {
  pb.layout = make_layout(pb.options, pb.q.batch, pb.q.seq, pb.k.seq);
  pb.row_delta = output_row_deltas(pb.o, pb.d_out);
  clear_rows_outside(pb);
  const position_window window = visited_window(pb.layout);
  const auto plan = make_bias_plan(bias, window, thread_count(pb.options.num_threads));
  if constexpr (differentiable_bias<Bias>) {
    fused_backward(pb, plan, [&] { return make_gradient_accumulator(bias, window); }, bias_grad);
  } else {
    static_assert(!learned_bias<Bias>, "a learned policy needs accumulate_offset_gradient or accumulate_gradient "
                                       "(see concepts.hpp) for attention_backward to reach its parameters");
    fused_backward(pb, plan, [] { return no_gradient_accumulator<S>{}; }, bias_grad);
  }
}

/// The backward's contract: every argument check of relbias::attention_backward, in its order;
/// the ring runs it on each rank's shard (see check_attention_call).
/// (Q, KV, O, DO: S, or 16-bit storage for the 16-bit backward of attention_half.hpp.)
template <class Bias, class S, class Q = S, class KV = S, class O = S, class DO = S>
void check_attention_backward_call(const char* where, const tensor_view<const Q>& q, const tensor_view<const KV>& k,
                                   const tensor_view<const KV>& v, const tensor_view<const O>& o,
                                   const tensor_view<const DO>& d_out, std::span<const S> lse, const Bias& bias,
                                   const attention_options<S>& options, const tensor_view<S>& dq, const tensor_view<S>& dk,
                                   const tensor_view<S>& dv, std::span<S> bias_grad) {
  check_contiguous_keys(where, options);
  check_qkv(where, q, k, v, index_t(bias.num_heads()), options);
  std::size_t parameter_count = 0;
  if constexpr (learned_bias<Bias>) parameter_count = std::size_t(bias.parameters().size());
  check_backward<S>(where, q, k, v, o, d_out, lse, dq, dk, dv, bias_grad, parameter_count);
  check_bias_mode(where, bias, options);
  check_sequences(where, q, k, options);
  check_no_aliasing(where, {block_of("dq", dq), block_of("dk", dk), block_of("dv", dv), block_of("bias_grad", bias_grad)},
                    {block_of("q", q), block_of("k", k), block_of("v", v), block_of("o", o), block_of("d_out", d_out),
                     block_of("lse", lse), parameter_block(bias)});
}

}  // namespace detail

/// Fused backward. Inputs as for attention() plus o and lse from the forward and d_out = dL/dO
/// [B, Lq, Hq, Dv]. dq, dk, dv (shaped like q, k, v) are overwritten; with GQA, dk and dv of a
/// key/value head sum over the query heads of its group. bias_grad, laid out like
/// bias.parameters(), is accumulated into (+=), since one table often serves many layers; pass
/// it empty to skip the bias gradient (required for policies without parameters).
template <bias_policy Bias, class S = typename Bias::scalar_type>
void attention_backward(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, input_tensor<S> o,
                        input_tensor<S> d_out, input_span<S> lse, const Bias& bias,
                        const attention_options<S>& options, output_tensor<S> dq, output_tensor<S> dk, output_tensor<S> dv,
                        output_span<S> bias_grad = {}) {
  // Preconditions
  detail::check_attention_backward_call("relbias::attention_backward", q, k, v, o, d_out, lse, bias, options, dq, dk, dv,
                                        bias_grad);

  detail::backward_problem<S> pb{q, k, v, o, d_out, lse, dq, dk, dv, options, options.scale_for(q.dim), q.heads / k.heads};
  detail::run_backward(pb, bias, bias_grad);
}

}  // namespace relbias

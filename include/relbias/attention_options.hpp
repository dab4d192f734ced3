#pragma once
// What every attention entry point (reference and fused, forward and backward) takes besides
// the tensors and the bias policy.

#include "relbias/offset.hpp"
#include "relbias/paged.hpp"
#include "relbias/sequences.hpp"
#include "relbias/tensor.hpp"

#include <cmath>
#include <concepts>
#include <limits>
#include <optional>
#include <span>
#include <vector>

namespace relbias {

/// How the 16-bit forward (attention_half.hpp) multiplies bfloat16 q, k, v:
///   fp32  every element widened to float, products and softmax in float: attention() of the
///         widened tensors up to float rounding (the default, on every CPU);
///   bf16  Q K^T and P V as bf16 products with float accumulation on Intel AMX where the CPU
///         has it (P rounded to bf16; docs/storage.md gives the error bound), the fp32 path
///         elsewhere, for Eigen::half storage, paged caches and explicit positions (the AMX
///         kernel packs contiguous keys). For prefill and training-sized calls: a
///         decoding step is limited by reading the cache, not by products.
/// Float and double inputs ignore it.
enum class compute_precision { fp32, bf16 };

template <std::floating_point Scalar>
struct attention_options {
  masking mask = masking::bidirectional;
  // Sliding (local) attention: a query sees only keys at distance < window, itself included:
  // causal i - w < j <= i (w keys), bidirectional |i - j| < w (up to 2w - 1 keys). Unset: no
  // window. Must be >= 1.
  std::optional<index_t> sliding_window{};
  index_t q_start = 0;                  // absolute position of query row 0 (kv_cache_q_start for decoding)
  index_t k_start = 0;                  // absolute position of key row 0
  // Real batches (sequences.hpp): where each sequence lives in the tensors and its positions.
  // Empty: every batch element is one sequence over all rows, at q_start / k_start (which must
  // stay 0 when sequences are given). Owned: `options.sequences = padded_sequences(lengths, L);`
  // is safe.
  sequence_list sequences{};
  // Paged KV cache (paged.hpp): k and v are pools [num_blocks, block_size, Hk, D] read through
  // a block table, one row per sequence. Fused forward only (attention()); needs sequences.
  std::optional<paged_kv> paged{};
  // Explicit positions (fused forward only), instead of q_start + row and k_start + row (and
  // each sequence's q_start / k_start, which are then ignored). Empty: not given. Non-owning.
  //   q_positions  one per row of q, [batch][Lq] (Hugging Face's position_ids): any values
  //   k_positions  one per row of k, [batch][Lk], or per pool slot [num_blocks][block_size] for
  //                a paged cache (llama.cpp's per-cell positions): strictly increasing along
  //                each sequence's keys, so that the keys a query sees stay one interval
  // Every position a sequence reads must lie in [0, 2^62). Shift-invariant policies keep their
  // table over every run of visible keys at consecutive positions (a whole tile, or the sinks
  // and the window of a StreamingLLM cache). FIRE reads the absolute query position: shifting
  // every position by t changes its bias for queries past its threshold L (docs/paged.md).
  std::span<const index_t> q_positions{};
  std::span<const index_t> k_positions{};
  std::optional<Scalar> scale{};      // multiplies Q K^T (not the bias); default 1/sqrt(dim), T5 uses 1
  int num_threads = 0;                // fused kernels: 0 = OpenMP's default; ignored without OpenMP
  compute_precision compute = compute_precision::fp32;  // bfloat16 inputs only: see compute_precision

  Scalar scale_for(index_t dim) const { return scale ? *scale : Scalar(1) / std::sqrt(Scalar(dim)); }
  offset_band band() const noexcept { return offset_band::of(mask, sliding_window); }
  position_window window(index_t query_length, index_t key_length) const {
    return {q_start, query_length, k_start, key_length};
  }
};

/// Owning result of the convenience overloads: O as [batch, Lq, heads, dim_v] and the row
/// log-sum-exp as [batch][heads][Lq].
///
/// A query row that sees no key at all (possible with causal masking and k_start > q_start + r)
/// has O = 0 and lse = -infinity, and passes no gradient: never NaN.
template <std::floating_point Scalar>
struct attention_result {
  tensor<Scalar> out;
  std::vector<Scalar> lse;
};

}  // namespace relbias

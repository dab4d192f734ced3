#pragma once
// Real batches: where each sequence of a call lives in the tensors, and at which positions.
//
// Design. A call is a list of sequences plus one mask, two independent things (as FlexAttention
// separates the block mask, which tiles to visit, from the score mod, which values to add):
//  * a `sequence` names a batch element, its query rows and key rows there (one contiguous range
//    of the seq axis each) and the absolute positions of its first query and first key. The bias
//    policies only ever see positions, so every policy (a user's too) works unchanged.
//  * the mask is a band of offsets delta = i - j (offset_band, offset.hpp): causal or
//    bidirectional, optionally narrowed by a sliding window (attention_options::sliding_window).
// Every batch shape is such a list:
//   uniform batch (the default)   one sequence per batch element: all rows, options.q_start/k_start
//   padded batch                  element b: rows [0, n_b) (right) or [L - n_b, L) (left), positions 0..
//   KV cache, spare capacity      key rows [0, filled) of k and v tensors of `capacity` rows
//   batched decoding              element b: its own filled length, its queries at its own last positions
//   packed (cu_seqlens)           batch element 0, sequence s in rows [cu[s], cu[s + 1]), positions from 0
// FlashAttention's varlen API (cu_seqlens_q/k, seqused_k, window_size) and xFormers' attn_bias
// classes (BlockDiagonalMask, ...PaddedKeysMask, LocalAttention...) are all lists of this kind.
//
// Because the band is convex and a sequence's keys are contiguous, the keys one query sees are a
// single interval, and so are the queries that see one key. The kernels map each (sequence,
// head, query tile) to the key tiles [begin, end) that meet the band and never visit any other:
// padding, other sequences and keys outside the window cost nothing, so a window's cost grows
// as L x window. Inside a tile each row's visible columns are one interval, so the inner loops
// test no element.
//
// Rows of q outside every sequence (padding) get O = 0, lse = -inf and dQ = 0; rows of k and v
// outside every sequence get dK = dV = 0.

#include "relbias/offset.hpp"

#include <initializer_list>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace relbias {

/// One sequence of a batch: rows of the tensors and their positions. Query row q_begin + r sits
/// at position q_start + r, key row k_begin + c at k_start + c; it attends only to its own keys.
struct sequence {
  index_t batch = 0;     ///< batch element holding it
  index_t q_begin = 0;   ///< first query row (seq axis of q, o, d_out, dq; lse's row)
  index_t q_length = 0;  ///< query rows (0: none)
  index_t k_begin = 0;   ///< first key row (seq axis of k, v, dk, dv)
  index_t k_length = 0;  ///< key rows: the filled part of a KV cache (0: none)
  index_t q_start = 0;   ///< absolute position of query row q_begin
  index_t k_start = 0;   ///< absolute position of key row k_begin
};

/// The sequences of one call (attention_options::sequences). It owns them, so a builder's
/// result can be assigned straight from the call: `options.sequences = padded_sequences(lengths,
/// L);` keeps no pointer to a temporary. A list from a builder also remembers the array it came
/// from, so errors found at the call name that array (`lengths[4]`, `cu_seqlens[3]`), not
/// `options.sequences[n]`. Converts from and to std::vector<sequence>.
class sequence_list {
 public:
  sequence_list() = default;
  sequence_list(std::vector<sequence> items) : items_(std::move(items)) {}
  sequence_list(std::span<const sequence> items) : items_(items.begin(), items.end()) {}
  sequence_list(std::initializer_list<sequence> items) : items_(items) {}
  /// A builder's list: entry n came from q_array / k_array (null: only options.sequences names it);
  /// at index n (ends = false, the entry is the length) or n + 1 (ends = true, cu_seqlens).
  sequence_list(std::vector<sequence> items, const char* q_array, const char* k_array, bool ends)
      : items_(std::move(items)), q_array_(q_array), k_array_(k_array), ends_(ends) {}

  operator const std::vector<sequence>&() const noexcept { return items_; }
  const std::vector<sequence>& items() const noexcept { return items_; }
  bool empty() const noexcept { return items_.empty(); }
  std::size_t size() const noexcept { return items_.size(); }
  const sequence* data() const noexcept { return items_.data(); }
  auto begin() const noexcept { return items_.begin(); }
  auto end() const noexcept { return items_.end(); }
  const sequence& operator[](std::size_t n) const { return items_[n]; }
  sequence& operator[](std::size_t n) { return items_[n]; }

  /// How an error names entry n's query (or key) rows: "lengths[2] = 300", "cu_seqlens[3] = 649",
  /// or "options.sequences[2]" for a list the caller built.
  std::string name(std::size_t n, bool query_rows) const {
    const char* array = query_rows ? q_array_ : k_array_;
    if (!array) return "options.sequences[" + std::to_string(n) + "]";
    const sequence& s = items_[n];
    const index_t begin = query_rows ? s.q_begin : s.k_begin, length = query_rows ? s.q_length : s.k_length;
    return std::string(array) + "[" + std::to_string(ends_ ? n + 1 : n) + "] = " + std::to_string(ends_ ? begin + length : length);
  }
  /// The array with one entry per batch element (padded and decoding lists), or null.
  const char* per_batch_array() const noexcept { return ends_ ? nullptr : k_array_; }

 private:
  std::vector<sequence> items_;
  const char* q_array_ = nullptr;
  const char* k_array_ = nullptr;
  bool ends_ = false;
};

/// Which end of a padded row holds the padding.
enum class padding { right, left };

namespace detail {

[[noreturn]] inline void fail_sequences(const char* where, const std::string& what) {
  throw std::invalid_argument(std::string(where) + ": " + what);
}

inline std::string entry(const char* name, std::size_t n, index_t value) {
  return std::string(name) + "[" + std::to_string(n) + "] = " + std::to_string(value);
}

}  // namespace detail

/// A padded batch for self-attention: batch element b holds one sequence of lengths[b] tokens in
/// a seq axis of padded_length rows, at rows [0, n) (padding::right) or [padded_length - n,
/// padded_length) (padding::left), its first token at position 0. Queries and keys share rows.
/// Throws std::invalid_argument if padded_length < 0 or a length is negative or above it.
inline sequence_list padded_sequences(std::span<const index_t> lengths, index_t padded_length,
                                              padding side = padding::right) {
  constexpr const char* where = "relbias::padded_sequences";
  if (padded_length < 0) detail::fail_sequences(where, "padded_length must be >= 0, got " + std::to_string(padded_length));
  std::vector<sequence> batch;
  for (std::size_t b = 0; b < lengths.size(); ++b) {
    const index_t n = lengths[b];
    if (n < 0) detail::fail_sequences(where, detail::entry("lengths", b, n) + " is negative");
    if (n > padded_length)
      detail::fail_sequences(where, detail::entry("lengths", b, n) + " exceeds padded_length = " + std::to_string(padded_length));
    const index_t first = side == padding::right ? 0 : padded_length - n;
    batch.push_back({.batch = index_t(b), .q_begin = first, .q_length = n, .k_begin = first, .k_length = n});
  }
  return {std::move(batch), "lengths", "lengths", false};
}

/// Packed variable-length sequences (FlashAttention's varlen layout, xFormers' BlockDiagonalMask):
/// every sequence in batch element 0, sequence s with query rows [cu_seqlens_q[s],
/// cu_seqlens_q[s + 1]) and key rows [cu_seqlens_k[s], cu_seqlens_k[s + 1]); positions restart
/// at 0 in each (assign q_start / k_start afterwards to give others). Throws
/// std::invalid_argument if the arrays differ in size, are empty, hold a negative entry or
/// decrease (sequences must not overlap).
inline sequence_list packed_sequences(std::span<const index_t> cu_seqlens_q, std::span<const index_t> cu_seqlens_k) {
  constexpr const char* where = "relbias::packed_sequences";
  if (cu_seqlens_q.empty() || cu_seqlens_q.size() != cu_seqlens_k.size())
    detail::fail_sequences(where, "cu_seqlens_q and cu_seqlens_k need one entry per sequence plus one (same nonzero size), got " +
                                      std::to_string(cu_seqlens_q.size()) + " and " + std::to_string(cu_seqlens_k.size()));
  for (const auto& [name, cu] : {std::pair{"cu_seqlens_q", cu_seqlens_q}, std::pair{"cu_seqlens_k", cu_seqlens_k}}) {
    if (cu[0] < 0) detail::fail_sequences(where, detail::entry(name, 0, cu[0]) + " is negative");
    for (std::size_t s = 1; s < cu.size(); ++s)
      if (cu[s] < cu[s - 1])
        detail::fail_sequences(where, name + std::string(" must not decrease (sequences overlap): ") + detail::entry(name, s, cu[s]) +
                                          " < " + detail::entry(name, s - 1, cu[s - 1]));
  }
  std::vector<sequence> batch;
  for (std::size_t s = 0; s + 1 < cu_seqlens_q.size(); ++s)
    batch.push_back({.q_begin = cu_seqlens_q[s], .q_length = cu_seqlens_q[s + 1] - cu_seqlens_q[s],
                     .k_begin = cu_seqlens_k[s], .k_length = cu_seqlens_k[s + 1] - cu_seqlens_k[s]});
  return {std::move(batch), "cu_seqlens_q", "cu_seqlens_k", true};
}

/// Packed self-attention: queries and keys share the rows [cu_seqlens[s], cu_seqlens[s + 1]).
inline sequence_list packed_sequences(std::span<const index_t> cu_seqlens) {
  return {packed_sequences(cu_seqlens, cu_seqlens).items(), "cu_seqlens", "cu_seqlens", true};
}

/// Batched decoding over a KV cache of `capacity` rows per batch element (FlashAttention's
/// cache_seqlens, xFormers' BlockDiagonalCausalWithOffsetPaddedKeysMask): element b has its first
/// key_lengths[b] cache rows filled, the newest query_length of them being the tokens whose
/// queries are q's rows [0, query_length). Those queries sit at positions key_lengths[b] -
/// query_length ... (bottom-right alignment, kv_cache_q_start per element), so each sequence is
/// at its own step. key_lengths[b] = 0 marks an idle slot: no query, no key (its output rows are
/// 0). Throws std::invalid_argument unless query_length >= 1 and each key length is 0 or in
/// [query_length, capacity].
inline sequence_list decoding_sequences(std::span<const index_t> key_lengths, index_t query_length, index_t capacity) {
  constexpr const char* where = "relbias::decoding_sequences";
  if (query_length < 1) detail::fail_sequences(where, "query_length must be >= 1, got " + std::to_string(query_length));
  std::vector<sequence> batch;
  for (std::size_t b = 0; b < key_lengths.size(); ++b) {
    const index_t n = key_lengths[b];
    if (n < 0) detail::fail_sequences(where, detail::entry("key_lengths", b, n) + " is negative");
    if (n > capacity)
      detail::fail_sequences(where, detail::entry("key_lengths", b, n) + " exceeds the cache capacity " + std::to_string(capacity));
    if (n != 0 && n < query_length)
      detail::fail_sequences(where, detail::entry("key_lengths", b, n) + " must be 0 (idle) or >= query_length = " +
                                        std::to_string(query_length));
    const index_t queries = n == 0 ? 0 : query_length;
    batch.push_back({.batch = index_t(b), .q_length = queries, .k_length = n, .q_start = n - queries});
  }
  return {std::move(batch), nullptr, "key_lengths", false};
}

}  // namespace relbias

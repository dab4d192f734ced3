#pragma once
// Positions and relative offsets: the one place where relbias turns rows and columns into the
// positions every policy and kernel sees.
//
//   query row r    -> absolute position i = q_start + r
//   key column c   -> absolute position j = k_start + c
//   offset         -> delta = i - j      (> 0: the key is in the past)
//   causal mask    -> key j hidden from query i iff j > i
//
// HF T5 uses the opposite sign (relative_position = j - i); see bias/t5.hpp.

#include "relbias/config.hpp"

#include "relbias/detail/eigen.hpp"

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>

namespace relbias {

/// Sizes, positions and offsets (Eigen's signed index; not `index`, which POSIX <strings.h> declares).
using index_t = Eigen::Index;

/// Whether a query may see keys after its own position.
enum class masking { bidirectional, causal };

constexpr index_t query_position(index_t q_start, index_t row) noexcept { return q_start + row; }
constexpr index_t key_position(index_t k_start, index_t column) noexcept { return k_start + column; }

/// delta = i - j: query position minus key position.
constexpr index_t relative_offset(index_t i, index_t j) noexcept { return i - j; }

/// |i - j|: the distance that bidirectional and symmetric kernels use.
constexpr index_t distance(index_t i, index_t j) noexcept { return i > j ? i - j : j - i; }

/// True when key j is hidden from query i.
constexpr bool is_masked(masking mode, index_t i, index_t j) noexcept {
  return mode == masking::causal && j > i;
}

/// Of n consecutive keys starting at position j0, how many query i sees. Always a prefix: causal
/// attention hides exactly the keys after i.
constexpr index_t visible_key_count(masking mode, index_t i, index_t j0, index_t n) noexcept {
  return mode == masking::causal ? std::clamp<index_t>(i - j0 + 1, 0, n) : n;
}

/// A half-open range [begin, end) of rows or columns.
struct index_range {
  index_t begin = 0, end = 0;
  constexpr index_t size() const noexcept { return end - begin; }
  constexpr bool empty() const noexcept { return end <= begin; }
};

/// Every mask relbias supports is a band of offsets: key j is visible to query i iff
/// min_offset <= i - j <= max_offset. Bidirectional: unbounded; causal: [0, inf); a sliding
/// window of w keys: causal [0, w - 1] (Mistral's sliding_window, FlashAttention's window_size
/// (w - 1, 0)), bidirectional [-(w - 1), w - 1] (window_size (w - 1, w - 1)). So the keys a query
/// sees are one interval of positions, and so are the queries that see a key: kernels compute
/// interval ends per row and per tile, never a test per element.
struct offset_band {
  // Positions lie in [0, 2^62) (checked at every entry), so every offset i - j has |i - j| <=
  // 2^62 - 1 = unbounded, and i - j0 -/+ a band end (+ 1) still fits in an index.
  static constexpr index_t unbounded = (index_t(1) << 62) - 1;
  index_t min_offset = -unbounded;
  index_t max_offset = unbounded;

  /// The band of a mask and an optional sliding window (window >= 1, checked at the entry points).
  static constexpr offset_band of(masking mode, std::optional<index_t> window) noexcept {
    offset_band band;
    if (mode == masking::causal) band.min_offset = 0;
    if (window) {
      const index_t w = std::min(*window, unbounded);  // a huge window is no window: no overflow in i - w
      band.max_offset = w - 1;
      if (mode == masking::bidirectional) band.min_offset = 1 - w;
    }
    return band;
  }

  constexpr bool contains(index_t delta) const noexcept { return delta >= min_offset && delta <= max_offset; }

  /// Of n keys at positions j0, j0 + 1, ..., the columns [begin, end) that query i sees.
  constexpr index_range visible_keys(index_t i, index_t j0, index_t n) const noexcept {
    const index_t begin = std::clamp<index_t>(i - max_offset - j0, 0, n);
    return {begin, std::clamp<index_t>(i - min_offset - j0 + 1, begin, n)};
  }

  /// Of n queries at positions i0, i0 + 1, ..., the rows [begin, end) that see at least one key
  /// with a position in [j_first, j_last].
  constexpr index_range queries_seeing(index_t i0, index_t n, index_t j_first, index_t j_last) const noexcept {
    const index_t begin = std::clamp<index_t>(j_first + min_offset - i0, 0, n);
    return {begin, std::clamp<index_t>(j_last + max_offset - i0 + 1, begin, n)};
  }
};

/// KV-cache decoding aligns the last query with the last key (bottom-right alignment):
/// the Lq new queries sit at positions Lk - Lq .. Lk - 1 when the keys start at 0.
/// This is FlashAttention's `i + seqlen_k - seqlen_q` and HF T5's cache_position.
inline index_t kv_cache_q_start(index_t query_length, index_t key_length) {
  if (query_length < 1 || key_length < query_length)
    throw std::invalid_argument("relbias::kv_cache_q_start: need 1 <= query_length <= key_length, got query_length=" +
                                std::to_string(query_length) + ", key_length=" + std::to_string(key_length));
  return key_length - query_length;
}

/// Clamp an offset into [lo, hi] (lo <= hi), as relative-position tables with a maximal
/// offset do (Shaw et al. 2018: clip(x, k) = max(-k, min(k, x))).
constexpr index_t clip_offset(index_t delta, index_t lo, index_t hi) noexcept { return std::clamp(delta, lo, hi); }

/// Index into a per-offset table with clip K: bidirectional tables have 2K+1 entries indexed by
/// clamp(delta, -K, K) + K; causal tables have K+1 entries indexed by clamp(delta, 0, K), so every
/// future key (masked anyway) shares entry 0 with delta = 0.
constexpr index_t clipped_offset_index(masking mode, index_t delta, index_t clip) noexcept {
  return mode == masking::causal ? clip_offset(delta, 0, clip) : clip_offset(delta, -clip, clip) + clip;
}

/// Entries of a per-offset table with clip K (see clipped_offset_index).
constexpr index_t clipped_offset_count(masking mode, index_t clip) noexcept {
  return mode == masking::causal ? clip + 1 : 2 * clip + 1;
}

/// The absolute positions one attention call covers: queries [q_start, q_start + Lq), keys
/// [k_start, k_start + Lk). Fast paths use it to bound the offsets that occur: every query they
/// are asked about sits at q_start or later, every (query, key) pair at an offset in
/// [min_offset(), max_offset()]. For batches of sequences at different positions the kernels
/// pass a covering window (covering()) whose lengths describe those offsets, not one sequence.
struct position_window {
  index_t q_start = 0;
  index_t query_length = 0;
  index_t k_start = 0;
  index_t key_length = 0;

  constexpr index_t min_offset() const noexcept { return q_start - (k_start + key_length - 1); }
  constexpr index_t max_offset() const noexcept { return q_start + query_length - 1 - k_start; }
  constexpr index_t offset_count() const noexcept { return max_offset() - min_offset() + 1; }
  constexpr index_t max_distance() const noexcept { return std::max(-min_offset(), max_offset()); }

  /// The window with queries from position `first_query` on and offsets [min_offset, max_offset]
  /// (min_offset <= max_offset), written as one query row against a run of keys.
  static constexpr position_window covering(index_t first_query, index_t min_offset, index_t max_offset) noexcept {
    return {first_query, 1, first_query - max_offset, max_offset - min_offset + 1};
  }
};

/// "causal" or "bidirectional": policies' configuration() text.
constexpr const char* masking_name(masking mode) noexcept { return mode == masking::causal ? "causal" : "bidirectional"; }

}  // namespace relbias

#pragma once
// The sequences of one call, checked and resolved into what the kernels iterate over
// (sequences.hpp explains the design): the list of sequences, the offset band, the tiles a
// sequence visits and the offsets the bias plans must cover.

#include "relbias/attention_options.hpp"
#include "relbias/detail/checks.hpp"
#include "relbias/offset.hpp"
#include "relbias/sequences.hpp"
#include "relbias/tensor.hpp"

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace relbias::detail {

inline std::string rows_text(index_t begin, index_t length) {
  std::string text("[");  // appended piece by piece: GCC 12 misreports "literal" + string (bug 105329)
  return text.append(std::to_string(begin)).append(", ").append(std::to_string(begin + length)).append(")");
}

/// One axis (query or key rows) of sequence n against a tensor of `rows` rows. source: what the
/// caller passed for these rows (sequence_list::name: "lengths[4] = 300" or "options.sequences[4]").
inline void check_sequence_rows(const char* where, const std::string& name, const std::string& source, const char* axis,
                                index_t begin, index_t length, const char* tensor, index_t rows) {
  if (length < 0) fail(where, name + "." + axis + "_length must be >= 0, got " + std::to_string(length));
  if (begin < 0) fail(where, name + "." + axis + "_begin must be >= 0, got " + std::to_string(begin));
  if (begin > rows - length)  // begin + length > rows, without overflow
    fail(where, source + (axis[0] == 'q' ? ": query" : ": key") + " rows " + rows_text(begin, length) + " exceed " + tensor + " = " +
                    std::to_string(rows));
}

/// A sequence's positions [start, start + length) within [0, 2^62], as check_positions for a call.
inline void check_sequence_positions(const char* where, const std::string& name, const char* start_name, index_t start,
                                     index_t length) {
  if (start < 0 || start > max_position - length)
    fail(where, name + "." + start_name + " must be in [0, 2^62 - length], got " + std::to_string(start) + " with length " +
                    std::to_string(length));
}

/// No two sequences of one batch element may share query rows (each row has one output) or key
/// rows (each work item of the backward owns its sequence's dK and dV rows).
inline void check_disjoint(const char* where, std::span<const sequence> sequences, bool query_rows) {
  struct rows {
    index_t batch, begin, end;
    std::size_t n;
  };
  std::vector<rows> used;
  for (std::size_t n = 0; n < sequences.size(); ++n) {
    const sequence& s = sequences[n];
    const index_t begin = query_rows ? s.q_begin : s.k_begin, length = query_rows ? s.q_length : s.k_length;
    if (length > 0) used.push_back({s.batch, begin, begin + length, n});
  }
  std::sort(used.begin(), used.end(), [](const rows& a, const rows& b) { return std::tie(a.batch, a.begin) < std::tie(b.batch, b.begin); });
  for (std::size_t u = 1; u < used.size(); ++u)
    if (used[u].batch == used[u - 1].batch && used[u].begin < used[u - 1].end)
      fail(where, "options.sequences[" + std::to_string(used[u - 1].n) + "] and options.sequences[" + std::to_string(used[u].n) +
                      "] overlap in the " + (query_rows ? "query" : "key") + " rows of batch element " +
                      std::to_string(used[u].batch) + ": " + rows_text(used[u - 1].begin, used[u - 1].end - used[u - 1].begin) +
                      " and " + rows_text(used[u].begin, used[u].end - used[u].begin));
}

/// The batch arguments: options.sliding_window >= 1; with options.sequences, q_start = k_start
/// = 0, each sequence inside q and k, no two overlapping, every batch element holding one (an
/// idle element is listed with zero lengths, so a lengths array of the wrong size is caught).
template <class Q, class K, class S>
void check_sequences(const char* where, const tensor_view<const Q>& q, const tensor_view<const K>& k,
                     const attention_options<S>& options) {
  if (options.sliding_window && *options.sliding_window < 1)
    fail(where, "options.sliding_window must be >= 1 (keys per query), got " + std::to_string(*options.sliding_window));
  if (options.sequences.empty()) return;
  if (options.q_start != 0 || options.k_start != 0)
    fail(where, "options.q_start and options.k_start must be 0 when options.sequences is given (each sequence carries its "
                "positions), got q_start = " + std::to_string(options.q_start) + ", k_start = " + std::to_string(options.k_start));
  std::vector<char> holds(std::size_t(q.batch), 0);
  for (std::size_t n = 0; n < options.sequences.size(); ++n) {
    const sequence& s = options.sequences[n];
    const std::string name = "options.sequences[" + std::to_string(n) + "]";
    const char* per_batch = options.sequences.per_batch_array();
    if (s.batch >= q.batch && per_batch)  // the array the caller passed has more entries than the batch
      fail(where, std::string(per_batch) + " has " + std::to_string(options.sequences.size()) +
                      " entries, one per batch element, but q holds " + std::to_string(q.batch) + " batch elements");
    if (s.batch < 0 || s.batch >= q.batch)
      fail(where, name + ".batch must be in [0, " + std::to_string(q.batch) + "), got " + std::to_string(s.batch));
    check_sequence_rows(where, name, options.sequences.name(n, true), "q", s.q_begin, s.q_length, "q.seq", q.seq);
    check_sequence_rows(where, name, options.sequences.name(n, false), "k", s.k_begin, s.k_length,
                        "k.seq (the capacity of k and v)", k.seq);
    check_sequence_positions(where, name, "q_start", s.q_start, s.q_length);
    check_sequence_positions(where, name, "k_start", s.k_start, s.k_length);
    holds[std::size_t(s.batch)] = 1;
  }
  for (index_t b = 0; b < q.batch; ++b)
    if (!holds[std::size_t(b)])
      fail(where, "batch element " + std::to_string(b) + " of " + std::to_string(q.batch) + " holds no sequence (" +
                      (options.sequences.per_batch_array() ? options.sequences.per_batch_array() : "options.sequences") + " has " +
                      std::to_string(options.sequences.size()) + " entries; list an idle element with zero lengths)");
  check_disjoint(where, options.sequences, true);
  check_disjoint(where, options.sequences, false);
}

/// What the kernels iterate over.
struct batch_layout {
  std::vector<sequence> sequences;
  offset_band band;
  bool explicit_sequences = false;  // from options.sequences: rows outside them may exist
};

/// The caller's sequences, or one per batch element over all rows at options.q_start / k_start.
template <class S>
batch_layout make_layout(const attention_options<S>& options, index_t batch, index_t query_length, index_t key_length) {
  batch_layout layout{{options.sequences.begin(), options.sequences.end()}, options.band(), !options.sequences.empty()};
  if (!layout.explicit_sequences)
    for (index_t b = 0; b < batch; ++b)
      layout.sequences.push_back({b, 0, query_length, 0, key_length, options.q_start, options.k_start});
  return layout;
}

/// Columns of the sequence's keys that some query row in [r0, r0 + n) sees. The band's ends
/// grow with the query position, so this is [first row's begin, last row's end).
inline index_range visible_key_columns(const offset_band& band, const sequence& s, index_t r0, index_t n) {
  if (n <= 0) return {};
  const index_t first = s.q_start + r0;
  return {band.visible_keys(first, s.k_start, s.k_length).begin, band.visible_keys(first + n - 1, s.k_start, s.k_length).end};
}

/// The offsets of every visible (query, key) pair of the call, and its first query position:
/// bias plans and gradient accumulators cover these and no more (a window's table holds about
/// 2 x window offsets per head, not Lq + Lk). Calls that see nothing get offset 0 alone.
inline position_window visited_window(const batch_layout& layout) {
  index_t first_query = std::numeric_limits<index_t>::max(), lo = std::numeric_limits<index_t>::max(), hi = std::numeric_limits<index_t>::min();
  for (const sequence& s : layout.sequences) {
    if (s.q_length == 0 || s.k_length == 0) continue;
    const index_t seq_lo = std::max(s.q_start - (s.k_start + s.k_length - 1), layout.band.min_offset);
    const index_t seq_hi = std::min(s.q_start + s.q_length - 1 - s.k_start, layout.band.max_offset);
    if (seq_lo > seq_hi) continue;  // no key visible to any query
    first_query = std::min(first_query, s.q_start);
    lo = std::min(lo, seq_lo);
    hi = std::max(hi, seq_hi);
  }
  if (lo > hi) return position_window::covering(0, 0, 0);
  return position_window::covering(first_query, lo, hi);
}

/// Calls visit(b, row) for each row of one axis (query or key rows) of a [batch, rows] tensor
/// that no sequence holds.
template <class Visit>
void for_each_row_outside(const batch_layout& layout, index_t batch, index_t rows, bool query_rows, Visit visit) {
  if (!layout.explicit_sequences) return;
  std::vector<char> held(std::size_t(batch * rows), 0);
  for (const sequence& s : layout.sequences) {
    const index_t begin = query_rows ? s.q_begin : s.k_begin, length = query_rows ? s.q_length : s.k_length;
    std::fill_n(held.begin() + std::ptrdiff_t(s.batch * rows + begin), length, char(1));
  }
  for (index_t b = 0; b < batch; ++b)
    for (index_t r = 0; r < rows; ++r)
      if (!held[std::size_t(b * rows + r)]) visit(b, r);
}

/// Every head of row r of batch b in t set to 0.
template <class S>
void zero_row(const tensor_view<S>& t, index_t b, index_t r) {
  for (index_t h = 0; h < t.heads; ++h) t.rows(b, h, r, 1).setZero();
}

/// Rows [r0, r0 + rows) of one sequence and the key columns they see: the unit of forward work.
struct query_tile {
  std::size_t sequence;
  index_t r0, rows;
  index_range keys;
};

/// Every query tile of every sequence, those that see the most keys first (dynamic scheduling
/// then balances causal and uneven batches). Tiles restart at each sequence's first row and
/// tile_rows(s) looks at that sequence only, so a sequence is cut exactly as it would be alone.
template <class TileRows>  // index_t(const sequence&)
std::vector<query_tile> query_tiles(const batch_layout& layout, TileRows tile_rows_of) {
  std::vector<query_tile> tiles;
  for (std::size_t n = 0; n < layout.sequences.size(); ++n) {
    const sequence& s = layout.sequences[n];
    const index_t tile_rows = tile_rows_of(s);
    for (index_t r0 = 0; r0 < s.q_length; r0 += tile_rows) {
      const index_t rows = std::min(tile_rows, s.q_length - r0);
      tiles.push_back({n, r0, rows, visible_key_columns(layout.band, s, r0, rows)});
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const query_tile& a, const query_tile& b) { return a.keys.size() > b.keys.size(); });
  return tiles;
}

inline std::vector<query_tile> query_tiles(const batch_layout& layout, index_t tile_rows) {
  return query_tiles(layout, [=](const sequence&) { return tile_rows; });
}

}  // namespace relbias::detail

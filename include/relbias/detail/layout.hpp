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
#include <memory>
#include <optional>
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

/// The entry points without a paged or explicit-position path (the backward, the reference
/// kernels, the ring) reject those options instead of reading the pools as contiguous keys.
template <class S>
void check_contiguous_keys(const char* where, const attention_options<S>& options) {
  if (options.paged)
    fail(where, "options.paged is supported by the fused forward (relbias::attention) only; gather the blocks into "
                "contiguous k and v tensors for this entry point");
  if (!options.q_positions.empty() || !options.k_positions.empty())
    fail(where, "options.q_positions / options.k_positions are supported by the fused forward (relbias::attention) only, got " +
                    std::to_string(options.q_positions.size()) + " and " + std::to_string(options.k_positions.size()) +
                    " positions; use q_start / k_start (or each sequence's) here");
}

/// options.paged against the pools k and v (check_qkv has checked that they share batch and
/// seq extents): a block size that is a positive multiple of 8 and the pools' seq extent, one
/// table row per sequence, and options.sequences given.
template <class K, class S>
void check_paged(const char* where, const tensor_view<const K>& k, const attention_options<S>& options) {
  const paged_kv& paged = *options.paged;
  if (paged.block_size < 8 || paged.block_size % 8 != 0)
    fail(where, "options.paged->block_size must be a positive multiple of 8, got " + std::to_string(paged.block_size));
  if (paged.block_size != k.seq)
    fail(where, "options.paged->block_size = " + std::to_string(paged.block_size) + " must equal the pools' block extent k.seq = " +
                    std::to_string(k.seq) + " (k and v pools are [num_blocks, block_size, heads, dim])");
  if (options.sequences.empty())
    fail(where, "options.paged needs options.sequences, one per block-table row (e.g. decoding_sequences(cache_seqlens, Lq, "
                "max_blocks * block_size))");
  if (paged.blocks.rows() != index_t(options.sequences.size()))
    fail(where, "options.paged->blocks has " + std::to_string(paged.blocks.rows()) + " rows but options.sequences has " +
                    std::to_string(options.sequences.size()) + " sequences (one block-table row per sequence)");
}

/// Sequence n's key rows in its block-table row: the row holds enough blocks for
/// [k_begin, k_begin + k_length) and every block it reads lies in the pool of num_blocks.
inline void check_paged_keys(const char* where, const paged_kv& paged, std::size_t n, const sequence& s, index_t num_blocks) {
  const std::string name = "options.sequences[" + std::to_string(n) + "]";
  if (s.k_length < 0) fail(where, name + ".k_length must be >= 0, got " + std::to_string(s.k_length));
  if (s.k_begin < 0) fail(where, name + ".k_begin must be >= 0, got " + std::to_string(s.k_begin));
  if (s.k_length == 0) return;
  const index_t capacity = paged.blocks.cols() * paged.block_size;
  if (s.k_begin > capacity - s.k_length)
    fail(where, "options.paged->blocks row " + std::to_string(n) + " is too short: its " + std::to_string(paged.blocks.cols()) +
                    " blocks of " + std::to_string(paged.block_size) + " keys hold " + std::to_string(capacity) + " keys, but " + name +
                    " reads key rows " + rows_text(s.k_begin, s.k_length));
  for (index_t block = s.k_begin / paged.block_size; block <= (s.k_begin + s.k_length - 1) / paged.block_size; ++block) {
    const index_t id = paged.blocks(index_t(n), block);
    if (id < 0 || id >= num_blocks)
      fail(where, "options.paged->blocks[" + std::to_string(n) + "][" + std::to_string(block) + "] = " + std::to_string(id) +
                      " is outside the pool of " + std::to_string(num_blocks) + " blocks (k.batch)");
  }
}

/// The sequences a call runs: options.sequences, or one per batch element over all rows.
template <class S>
std::vector<sequence> resolved_sequences(const attention_options<S>& options, index_t batch, index_t query_length, index_t key_length) {
  std::vector<sequence> list(options.sequences.begin(), options.sequences.end());
  if (list.empty())
    for (index_t b = 0; b < batch; ++b) list.push_back({b, 0, query_length, 0, key_length, options.q_start, options.k_start});
  return list;
}

/// Where logical key column c of sequence n (s) lives: slot paged ? block * block_size + row :
/// batch * key_length + row, the index of its row of k in [num_blocks or batch][block_size or Lk].
inline index_t key_slot(const std::optional<paged_kv>& paged, index_t key_length, std::size_t n, const sequence& s, index_t c) {
  const index_t row = s.k_begin + c;
  if (!paged) return s.batch * key_length + row;
  return paged->blocks(index_t(n), row / paged->block_size) * paged->block_size + row % paged->block_size;
}

[[noreturn]] inline void fail_position(const char* where, const char* array, index_t slot, index_t value, const std::string& why) {
  fail(where, std::string("options.") + array + "[" + std::to_string(slot) + "] = " + std::to_string(value) + " " + why);
}

/// options.q_positions and k_positions: one per row of q (of k, or of the pool), and each
/// position a sequence reads in [0, 2^62), the keys' strictly increasing along each sequence.
template <class Q, class K, class S>
void check_explicit_positions(const char* where, const tensor_view<const Q>& q, const tensor_view<const K>& k,
                              const attention_options<S>& options) {
  const auto sizes = [&](const char* array, std::size_t size, index_t extent, index_t rows, const char* what) {
    const index_t expected = checked_product(where, std::string("options.") + array + " size", {extent, rows});
    if (size != 0 && index_t(size) != expected)
      fail(where, std::string("options.") + array + " must be empty or hold one position per " + what + " = " + std::to_string(expected) +
                      ", got " + std::to_string(size));
  };
  sizes("q_positions", options.q_positions.size(), q.batch, q.seq, "row of q (batch * Lq)");
  sizes("k_positions", options.k_positions.size(), k.batch, k.seq,
        options.paged ? "slot of the pool (num_blocks * block_size)" : "row of k (batch * Lk)");
  if (options.q_positions.empty() && options.k_positions.empty()) return;
  const std::vector<sequence> list = resolved_sequences(options, q.batch, q.seq, k.seq);
  const std::string range = "must be in [0, 2^62)";
  for (std::size_t n = 0; n < list.size(); ++n) {
    const sequence& s = list[n];
    const std::string of = " (options.sequences[" + std::to_string(n) + "]) ";
    for (index_t r = 0; r < s.q_length && !options.q_positions.empty(); ++r) {
      const index_t slot = s.batch * q.seq + s.q_begin + r, value = options.q_positions[std::size_t(slot)];
      if (value < 0 || value >= max_position) fail_position(where, "q_positions", slot, value, "of a query row" + of + range);
    }
    index_t previous = -1;
    for (index_t c = 0; c < s.k_length && !options.k_positions.empty(); ++c) {
      const index_t slot = key_slot(options.paged, k.seq, n, s, c), value = options.k_positions[std::size_t(slot)];
      if (value < 0 || value >= max_position) fail_position(where, "k_positions", slot, value, "of a key" + of + range);
      if (value <= previous)
        fail_position(where, "k_positions", slot, value,
                      "of key " + std::to_string(c) + of + "must exceed the position of the key before it, " + std::to_string(previous) +
                          " (a sequence's key positions must increase strictly)");
      previous = value;
    }
  }
}

/// check_sequences' part on options.sequences.
template <class Q, class K, class S>
void check_sequence_list(const char* where, const tensor_view<const Q>& q, const tensor_view<const K>& k,
                         const attention_options<S>& options) {
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
    if (options.paged) check_paged_keys(where, *options.paged, n, s, k.batch);
    else
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
  if (!options.paged) check_disjoint(where, options.sequences, false);  // blocks may be shared
}

/// The batch arguments: options.sliding_window >= 1; with options.sequences, q_start = k_start
/// = 0, each sequence inside q and k, no two overlapping, every batch element holding one (an
/// idle element is listed with zero lengths, so a lengths array of the wrong size is caught).
/// With options.paged, key rows are checked against the block table (check_paged_keys) and may
/// be shared; explicit positions as check_explicit_positions.
template <class Q, class K, class S>
void check_sequences(const char* where, const tensor_view<const Q>& q, const tensor_view<const K>& k,
                     const attention_options<S>& options) {
  if (options.sliding_window && *options.sliding_window < 1)
    fail(where, "options.sliding_window must be >= 1 (keys per query), got " + std::to_string(*options.sliding_window));
  if (options.paged) check_paged(where, k, options);
  check_sequence_list(where, q, k, options);
  check_explicit_positions(where, q, k, options);
}

/// Positions of one sequence's query rows and key columns: start + index, or the caller's
/// arrays (options.q_positions / k_positions, the keys' strictly increasing).
struct sequence_positions {
  index_t q_start = 0, k_start = 0;
  const index_t* q = nullptr;  // q_length positions, or null: q_start + r
  const index_t* k = nullptr;  // k_length positions, or null: k_start + c

  index_t query(index_t r) const noexcept { return q ? q[r] : query_position(q_start, r); }
  index_t key(index_t c) const noexcept { return k ? k[c] : key_position(k_start, c); }
  /// Whether keys [c0, c0 + n) sit at consecutive positions (strictly increasing: the ends decide).
  bool consecutive_keys(index_t c0, index_t n) const noexcept { return !k || n <= 1 || k[c0 + n - 1] - k[c0] == n - 1; }
  /// Of the n keys from column c0, the columns [begin, end) that query position i sees: the band's
  /// interval for consecutive keys, two binary searches over increasing ones.
  index_range visible_keys(const offset_band& band, index_t i, index_t c0, index_t n) const noexcept {
    if (!k) return band.visible_keys(i, key_position(k_start, c0), n);
    const index_t* first = k + c0;
    const index_t begin = std::lower_bound(first, first + n, i - band.max_offset) - first;
    return {begin, std::max(begin, index_t(std::upper_bound(first + begin, first + n, i - band.min_offset) - first))};
  }
};

/// What the kernels iterate over.
struct batch_layout {
  std::vector<sequence> sequences;
  offset_band band;
  bool explicit_sequences = false;  // from options.sequences: rows outside them may exist
  std::optional<paged_kv> paged{};  // k and v are pools read through paged->blocks (row n: sequence n)
  std::vector<sequence_positions> positions;  // one per sequence
  std::shared_ptr<const std::vector<index_t>> gathered_key_positions{};  // paged + k_positions: each sequence's, in order

  /// Calls visit(element, row, column, count) for each run of keys [c0, c0 + n) of sequence `s`
  /// that lie in consecutive rows of one batch element (one pool block when paged): columns
  /// [column, column + count) are rows [row, row + count) of element `element` of k and v.
  template <class Visit>
  void key_runs(std::size_t s, index_t c0, index_t n, Visit visit) const {
    const sequence& seq = sequences[s];
    if (!paged) {
      if (n > 0) visit(seq.batch, seq.k_begin + c0, index_t(0), n);
      return;
    }
    const index_t size = paged->block_size, first = seq.k_begin + c0;
    // One division for the first run; the next runs start at row 0 of the next logical block.
    for (index_t column = 0, block = first / size, row = first % size; column < n; ++block, row = 0) {
      const index_t count = std::min(size - row, n - column);
      visit(paged->blocks(index_t(s), block), row, column, count);
      column += count;
    }
  }
};

/// The caller's sequences, or one per batch element over all rows at options.q_start / k_start,
/// with their positions and, for a paged cache, its table.
template <class S>
batch_layout make_layout(const attention_options<S>& options, index_t batch, index_t query_length, index_t key_length) {
  batch_layout layout{resolved_sequences(options, batch, query_length, key_length), options.band(), !options.sequences.empty(),
                      options.paged, {}, {}};
  std::vector<index_t> gathered;
  if (options.paged && !options.k_positions.empty()) {  // each sequence's key positions, in logical order
    for (std::size_t n = 0; n < layout.sequences.size(); ++n)
      for (index_t c = 0; c < layout.sequences[n].k_length; ++c)
        gathered.push_back(options.k_positions[std::size_t(key_slot(options.paged, key_length, n, layout.sequences[n], c))]);
    layout.gathered_key_positions = std::make_shared<const std::vector<index_t>>(std::move(gathered));
  }
  std::size_t next_gathered = 0;
  for (const sequence& s : layout.sequences) {
    sequence_positions p{s.q_start, s.k_start};
    if (!options.q_positions.empty()) p.q = options.q_positions.data() + (s.batch * query_length + s.q_begin);
    if (layout.gathered_key_positions) {
      p.k = layout.gathered_key_positions->data() + next_gathered;
      next_gathered += std::size_t(s.k_length);
    } else if (!options.k_positions.empty()) {
      p.k = options.k_positions.data() + (s.batch * key_length + s.k_begin);
    }
    layout.positions.push_back(p);
  }
  return layout;
}

/// Columns of the sequence's keys that some query row in [r0, r0 + n) sees. The band's ends
/// grow with the query position, so this is [first row's begin, last row's end).
inline index_range visible_key_columns(const offset_band& band, const sequence& s, index_t r0, index_t n) {
  if (n <= 0) return {};
  const index_t first = s.q_start + r0;
  return {band.visible_keys(first, s.k_start, s.k_length).begin, band.visible_keys(first + n - 1, s.k_start, s.k_length).end};
}

/// Columns of sequence n's keys that some query row in [r0, r0 + n) sees: for consecutive
/// queries the band's ends grow with the position, so [first row's begin, last row's end);
/// explicit query positions take the smallest begin and the largest end over the rows.
inline index_range visible_key_columns(const batch_layout& layout, std::size_t s, index_t r0, index_t rows) {
  const sequence_positions& p = layout.positions[s];
  const index_t keys = layout.sequences[s].k_length;
  if (rows <= 0) return {};
  if (!p.q) return {p.visible_keys(layout.band, p.query(r0), 0, keys).begin, p.visible_keys(layout.band, p.query(r0 + rows - 1), 0, keys).end};
  index_range hull{keys, 0};
  for (index_t r = r0; r < r0 + rows; ++r) {
    const index_range v = p.visible_keys(layout.band, p.query(r), 0, keys);
    if (!v.empty()) hull = {std::min(hull.begin, v.begin), std::max(hull.end, v.end)};
  }
  return hull.empty() ? index_range{} : hull;
}

/// The offsets of every visible (query, key) pair of the call, and its first query position:
/// bias plans and gradient accumulators cover these and no more (a window's table holds about
/// 2 x window offsets per head, not Lq + Lk). Calls that see nothing get offset 0 alone.
/// Explicit positions: the smallest and largest query and key position of each sequence bound them.
inline position_window visited_window(const batch_layout& layout) {
  index_t first_query = std::numeric_limits<index_t>::max(), lo = std::numeric_limits<index_t>::max(), hi = std::numeric_limits<index_t>::min();
  for (std::size_t n = 0; n < layout.sequences.size(); ++n) {
    const sequence& s = layout.sequences[n];
    const sequence_positions& p = layout.positions[n];
    if (s.q_length == 0 || s.k_length == 0) continue;
    index_t q_lo = p.query(0), q_hi = p.query(s.q_length - 1);
    if (p.q) std::tie(q_lo, q_hi) = std::pair(*std::min_element(p.q, p.q + s.q_length), *std::max_element(p.q, p.q + s.q_length));
    const index_t seq_lo = std::max(q_lo - p.key(s.k_length - 1), layout.band.min_offset);
    const index_t seq_hi = std::min(q_hi - p.key(0), layout.band.max_offset);
    if (seq_lo > seq_hi) continue;  // no key visible to any query
    first_query = std::min(first_query, q_lo);
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
      tiles.push_back({n, r0, rows, visible_key_columns(layout, n, r0, rows)});
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const query_tile& a, const query_tile& b) { return a.keys.size() > b.keys.size(); });
  return tiles;
}

inline std::vector<query_tile> query_tiles(const batch_layout& layout, index_t tile_rows) {
  return query_tiles(layout, [=](const sequence&) { return tile_rows; });
}

}  // namespace relbias::detail

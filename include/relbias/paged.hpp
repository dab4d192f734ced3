#pragma once
// Paged KV caches (vLLM's PagedAttention, FlashAttention's block_table + cache_seqlens): keys and
// values live in a pool of fixed-size blocks shared by every sequence, and each sequence lists the
// blocks that hold its keys, in order.
//
//   k pool [num_blocks, block_size, kv_heads, dim], v pool [num_blocks, block_size, kv_heads, dim_v]
//   block_table [num_seqs, max_blocks]: row n = the blocks of options.sequences[n]
//   logical key row r of sequence n  ->  row r % block_size of pool block block_table[n][r / block_size]
//
// Design. The pools are the k and v arguments of attention() themselves (their batch axis is the
// block id, their seq axis the row in a block), so every storage type of k and v (float, double,
// Eigen::half, Eigen::bfloat16), every stride and GQA work unchanged, and nothing new is copied.
// The description of the table goes into attention_options::paged; a sequence's k_begin and
// k_length then count logical rows of its table row (as cache_seqlens does), its batch field
// names q's batch element only. Several table rows may name the same block: a shared prompt
// (prefix caching), beam search or parallel sampling store it once; copy-on-write when a shared
// block is appended to is the caller's business. The table is plain int32 or int64 memory,
// row-major, what a Python binding receives from numpy or torch without conversion.
//
// The kernels cut a sequence's keys into the tiles a contiguous cache gives (tiles count logical
// rows) and reach a tile's rows a run at a time (the rows of the tile inside one block): prefill
// packs the runs as it packs contiguous rows, the 16-bit streamed loop walks each run with the
// strides of a contiguous cache (one table lookup per block), float decoding runs one product per
// block of 64+ keys or copies smaller blocks' runs into the tile buffer. So a paged call gives the bits of the same keys contiguous, except
// float decoding over blocks of 64+ keys (within float rounding: P V summed block by block).
// Blocks of 64 keys and more keep decoding near a contiguous cache's speed (docs/paged.md).
//
// Only the fused forward reads a paged cache (relbias::attention, float and 16-bit pools); the
// backward, the reference kernels and ring attention take contiguous keys and reject
// options.paged (gather the blocks into a tensor to train on them).

#include "relbias/offset.hpp"

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

namespace relbias {

/// A block table [rows, cols] of int32 or int64 block ids, row-major and contiguous (vLLM's
/// block_tables, FlashAttention's block_table). Non-owning: the memory must outlive the call.
/// Entries past a sequence's key length are never read (they may hold padding such as -1).
/// Throws std::invalid_argument unless rows >= 0, cols >= 0 and ids.size() == rows * cols.
class block_table {
 public:
  block_table() = default;
  block_table(std::span<const std::int32_t> ids, index_t rows, index_t cols) : ids32_(ids.data()), rows_(rows), cols_(cols) {
    check_size(ids.size());
  }
  block_table(std::span<const std::int64_t> ids, index_t rows, index_t cols) : ids64_(ids.data()), rows_(rows), cols_(cols) {
    check_size(ids.size());
  }

  index_t rows() const noexcept { return rows_; }
  index_t cols() const noexcept { return cols_; }
  /// Block id of logical block `col` of table row `row` (0 <= row < rows, 0 <= col < cols).
  index_t operator()(index_t row, index_t col) const noexcept {
    const index_t n = row * cols_ + col;
    return ids32_ ? index_t(ids32_[n]) : index_t(ids64_[n]);
  }

 private:
  void check_size(std::size_t size) const {
    if (rows_ < 0 || cols_ < 0 || (rows_ > 0 && cols_ > 0 && index_t(size) / cols_ != rows_) || index_t(size) != rows_ * cols_)
      throw std::invalid_argument("relbias::block_table: ids must hold rows * cols block ids (rows, cols >= 0), got " +
                                  std::to_string(size) + " ids for rows = " + std::to_string(rows_) + ", cols = " +
                                  std::to_string(cols_));
  }

  const std::int32_t* ids32_ = nullptr;
  const std::int64_t* ids64_ = nullptr;
  index_t rows_ = 0, cols_ = 0;
};

/// How attention() reads keys and values from pools of blocks (attention_options::paged).
///   block_size  keys per block: the seq extent of the k and v pools; a multiple of 8
///   blocks      row n: the pool blocks of options.sequences[n], in order; as many rows as
///               sequences, at least ceil((k_begin + k_length) / block_size) columns
/// Needs options.sequences: decoding_sequences(cache_seqlens, Lq, max_blocks * block_size) is
/// FlashAttention's flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table).
/// Errors (std::invalid_argument from attention()): block_size not a positive multiple of 8 or
/// not the pools' seq extent; a table whose row count differs from the sequences' or whose row
/// is too short for its sequence's keys; a block id the sequence reads outside [0, num_blocks).
struct paged_kv {
  index_t block_size = 0;
  block_table blocks{};
};

}  // namespace relbias

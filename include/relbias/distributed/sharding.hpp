#pragma once
// How a sequence of L rows is split over the P ranks of a ring (sequence or context
// parallelism), and helpers that cut a tensor into a rank's shard and put a shard back.
// No MPI here: a layout is plain arithmetic that every rank computes alike.
//
//   contiguous  rank r holds rows [start_r, start_r + n_r), n_r = L / P + (r < L mod P)
//   zigzag      2P chunks, chunk c of L / (2P) + (c < L mod 2P) rows; rank r holds chunk r
//               followed by chunk 2P - 1 - r (ring-flash-attention's zigzag; Megatron-LM's
//               context parallelism splits the same way), so under a causal mask every rank
//               sees about the same number of unmasked (query, key) pairs.
//
// Both modes fix every rank's length from (L, P): the ring checks that the shards it is given
// match, since a key's global position is read off the layout.
//
// A shard is one or two windows: runs of consecutive global rows stored one after the other in
// the rank's local tensor. Under zigzag the two windows sit at different global positions, so a
// kernel call covers one window at a time (its own q_start / k_start).

#include "relbias/offset.hpp"
#include "relbias/tensor.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace relbias::distributed {

enum class sharding { contiguous, zigzag };

inline const char* sharding_name(sharding mode) noexcept { return mode == sharding::zigzag ? "zigzag" : "contiguous"; }

/// Consecutive global rows [global_first, global_first + count) stored at local rows
/// [local_first, local_first + count) of one rank's shard.
struct shard_window {
  index_t global_first = 0;
  index_t local_first = 0;
  index_t count = 0;
};

/// The windows of every rank for a sequence of `length` rows over `ranks` ranks.
class ring_layout {
 public:
  /// Balanced layout (see the file comment). Needs ranks >= 1 and length >= ranks, so that every
  /// rank holds at least one row; throws std::invalid_argument otherwise.
  ring_layout(index_t length, int ranks, sharding mode) : length_(length), mode_(mode), windows_(std::size_t(std::max(ranks, 0))) {
    if (ranks < 1 || length < ranks)
      throw std::invalid_argument("relbias::distributed::ring_layout: need ranks >= 1 and length >= ranks, got length=" +
                                  std::to_string(length) + ", ranks=" + std::to_string(ranks));
    const index_t parts = mode == sharding::zigzag ? 2 * index_t(ranks) : index_t(ranks);
    for (int r = 0; r < ranks; ++r) {
      add_part(r, index_t(r), parts);
      if (mode == sharding::zigzag) add_part(r, parts - 1 - r, parts);
    }
  }

  index_t length() const noexcept { return length_; }
  int ranks() const noexcept { return int(windows_.size()); }
  sharding mode() const noexcept { return mode_; }
  /// The rank's non-empty windows in local order.
  const std::vector<shard_window>& windows(int rank) const {
    if (rank < 0 || rank >= ranks())
      throw std::invalid_argument("relbias::distributed::ring_layout: rank must be in [0, " + std::to_string(ranks()) +
                                  "), got " + std::to_string(rank));
    return windows_[std::size_t(rank)];
  }
  /// Rows the rank holds.
  index_t shard_length(int rank) const {
    const auto& w = windows(rank);
    return w.empty() ? 0 : w.back().local_first + w.back().count;
  }
  index_t max_shard_length() const {
    index_t longest = 0;
    for (int r = 0; r < ranks(); ++r) longest = std::max(longest, shard_length(r));
    return longest;
  }

 private:
  // Part p of `parts` near-equal parts: the first length mod parts parts get one more row.
  void add_part(int rank, index_t part, index_t parts) {
    const index_t base = length_ / parts, extra = length_ % parts;
    const index_t first = part * base + std::min(part, extra);
    const index_t count = base + (part < extra ? 1 : 0);
    if (count == 0) return;
    auto& w = windows_[std::size_t(rank)];
    w.push_back({first, w.empty() ? 0 : w.back().local_first + w.back().count, count});
  }

  index_t length_;
  sharding mode_;
  std::vector<std::vector<shard_window>> windows_;
};

namespace detail {

/// Copies sequence rows [src_first, src_first + count) of src to rows [dst_first, ...) of dst
/// (same batch, heads and dim; any strides).
template <class S>
void copy_rows(const tensor_view<const S>& src, index_t src_first, const tensor_view<S>& dst, index_t dst_first,
               index_t count) {
  for (index_t b = 0; b < src.batch; ++b)
    for (index_t s = 0; s < count; ++s)
      for (index_t h = 0; h < src.heads; ++h)
        std::copy_n(src.row(b, src_first + s, h), src.dim, dst.row(b, dst_first + s, h));
}

template <class S, class T>
void check_shard_shapes(const char* where, const tensor_view<S>& global, const tensor_view<T>& local,
                        const ring_layout& layout, int rank) {
  if (global.seq != layout.length() || local.seq != layout.shard_length(rank) || global.batch != local.batch ||
      global.heads != local.heads || global.dim != local.dim)
    throw std::invalid_argument(std::string(where) + ": global [batch, seq, heads, dim] = [" + std::to_string(global.batch) +
                                ", " + std::to_string(global.seq) + ", " + std::to_string(global.heads) + ", " +
                                std::to_string(global.dim) + "] and shard [" + std::to_string(local.batch) + ", " +
                                std::to_string(local.seq) + ", " + std::to_string(local.heads) + ", " +
                                std::to_string(local.dim) + "] do not fit the layout (length " +
                                std::to_string(layout.length()) + ", rank " + std::to_string(rank) + " holds " +
                                std::to_string(layout.shard_length(rank)) + " rows)");
}

}  // namespace detail

/// Copies rank `rank`'s rows of `global` [B, L, H, D] into `local` [B, shard_length(rank), H, D].
/// Any strides: a row log-sum-exp laid out [b][h][row] is bhsd(lse, B, H, L, 1).
template <class S>
void shard(tensor_view<const S> global, const ring_layout& layout, int rank, tensor_view<S> local) {
  detail::check_shard_shapes("relbias::distributed::shard", global, local, layout, rank);
  for (const auto& w : layout.windows(rank)) detail::copy_rows(global, w.global_first, local, w.local_first, w.count);
}

/// Rank `rank`'s shard of `global` as a new contiguous [B, shard_length(rank), H, D] tensor.
template <class S>
tensor<S> shard(tensor_view<const S> global, const ring_layout& layout, int rank) {
  tensor<S> local(global.batch, layout.shard_length(rank), global.heads, global.dim);
  shard(global, layout, rank, local.view());
  return local;
}

/// shard() of a tensor the caller may still write (`shard(q_all.view(), layout, rank)`): a
/// non-const view does not deduce S in the overloads above.
template <class S>
  requires(!std::is_const_v<S>)
tensor<S> shard(tensor_view<S> global, const ring_layout& layout, int rank) {
  return shard(tensor_view<const S>(global), layout, rank);
}
template <class S>
  requires(!std::is_const_v<S>)
void shard(tensor_view<S> global, const ring_layout& layout, int rank, tensor_view<S> local) {
  shard(tensor_view<const S>(global), layout, rank, local);
}

/// The inverse of shard(): writes rank `rank`'s `local` rows to their places in `global`.
/// Calling it for every rank's shard rebuilds the whole tensor.
template <class S>
void unshard(tensor_view<const S> local, const ring_layout& layout, int rank, tensor_view<S> global) {
  detail::check_shard_shapes("relbias::distributed::unshard", global, local, layout, rank);
  for (const auto& w : layout.windows(rank)) detail::copy_rows(local, w.local_first, global, w.global_first, w.count);
}
template <class S>
  requires(!std::is_const_v<S>)
void unshard(tensor_view<S> local, const ring_layout& layout, int rank, tensor_view<S> global) {
  unshard(tensor_view<const S>(local), layout, rank, global);
}

}  // namespace relbias::distributed

#pragma once
// Non-owning strided views over the user's own memory, so kernels read [batch, seq, heads, dim]
// and [batch, heads, seq, dim] tensors (or any other strides with a contiguous last axis)
// without copies.

#include "relbias/offset.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <new>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace relbias {

/// A 4-D tensor [batch, seq, heads, dim] with element strides for the first three axes; the last
/// axis (dim) is contiguous. T is `float` or `double`, or a 16-bit storage format for the inputs of
/// the forward (`Eigen::half`, `Eigen::bfloat16`: attention_half.hpp), or a const version of them.
template <class T>
struct tensor_view {
  T* data = nullptr;
  index_t batch = 0, seq = 0, heads = 0, dim = 0;
  index_t batch_stride = 0, seq_stride = 0, head_stride = 0;

  using scalar_type = std::remove_const_t<T>;
  using row_matrix = Eigen::Matrix<scalar_type, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using matrix_map = Eigen::Map<std::conditional_t<std::is_const_v<T>, const row_matrix, row_matrix>, 0,
                                Eigen::OuterStride<>>;

  T* row(index_t b, index_t s, index_t h) const noexcept { return data + b * batch_stride + s * seq_stride + h * head_stride; }

  /// Rows [first, first + count) of head h in batch b as an Eigen matrix (count, dim).
  matrix_map rows(index_t b, index_t h, index_t first, index_t count) const {
    return matrix_map(row(b, first, h), count, dim, Eigen::OuterStride<>(seq_stride));
  }
  matrix_map matrix(index_t b, index_t h) const { return rows(b, h, 0, seq); }

  /// Positions [first, first + count) of the sequence axis, same memory (a KV-cache prefix, one
  /// decoding step's query).
  /// Throws std::invalid_argument unless 0 <= first and 0 <= count <= seq - first.
  tensor_view positions(index_t first, index_t count) const {
    if (first < 0 || count < 0 || first > seq || count > seq - first)
      throw std::invalid_argument("relbias::tensor_view::positions: need 0 <= first and first + count <= seq = " +
                                  std::to_string(seq) + ", got first=" + std::to_string(first) + ", count=" + std::to_string(count));
    return {data + first * seq_stride, batch, count, heads, dim, batch_stride, seq_stride, head_stride};
  }

  operator tensor_view<const T>() const noexcept requires(!std::is_const_v<T>) {
    return {data, batch, seq, heads, dim, batch_stride, seq_stride, head_stride};
  }
};

/// Parameter types of the public kernels. Non-deduced (the scalar comes from the bias policy), so
/// a tensor_view<float> binds to an input and std::vector<float> binds to a std::span output.
template <class S>
using input_tensor = std::type_identity_t<tensor_view<const S>>;
template <class S>
using output_tensor = std::type_identity_t<tensor_view<S>>;
template <class S>
using output_span = std::type_identity_t<std::span<S>>;
template <class S>
using input_span = std::type_identity_t<std::span<const S>>;

/// Copies `from` into `to` element by element, converting the element type (static_cast: float to
/// Eigen::half or Eigen::bfloat16 rounds to nearest even, half overflows to +-inf beyond 65504;
/// the 16-bit formats to float are exact). Fills a bf16/f16 KV cache, or widens one for checks.
/// Throws std::invalid_argument unless both views have the same shape and, if not empty, data.
template <class From, class To>
void convert(tensor_view<From> from, tensor_view<To> to) {
  const bool empty = from.batch <= 0 || from.seq <= 0 || from.heads <= 0 || from.dim <= 0;
  if (!empty && (from.data == nullptr || to.data == nullptr))
    throw std::invalid_argument("relbias::convert: from and to need data (a null pointer was given)");
  if (from.batch != to.batch || from.seq != to.seq || from.heads != to.heads || from.dim != to.dim)
    throw std::invalid_argument("relbias::convert: from and to must have the same shape [batch, seq, heads, dim], got [" +
                                std::to_string(from.batch) + ", " + std::to_string(from.seq) + ", " + std::to_string(from.heads) +
                                ", " + std::to_string(from.dim) + "] and [" + std::to_string(to.batch) + ", " +
                                std::to_string(to.seq) + ", " + std::to_string(to.heads) + ", " + std::to_string(to.dim) + "]");
  for (index_t b = 0; b < from.batch; ++b)
    for (index_t s = 0; s < from.seq; ++s)
      for (index_t h = 0; h < from.heads; ++h)
        std::transform(from.row(b, s, h), from.row(b, s, h) + from.dim, to.row(b, s, h),
                       [](auto x) { return static_cast<std::remove_const_t<To>>(x); });
}

/// View memory laid out as [batch, seq, heads, dim] (PyTorch's default for q/k/v projections).
template <class T>
tensor_view<T> bshd(T* data, index_t batch, index_t seq, index_t heads, index_t dim) {
  return {data, batch, seq, heads, dim, seq * heads * dim, heads * dim, dim};
}

/// View memory laid out as [batch, heads, seq, dim] (after PyTorch's transpose(1, 2)).
template <class T>
tensor_view<T> bhsd(T* data, index_t batch, index_t heads, index_t seq, index_t dim) {
  return {data, batch, seq, heads, dim, heads * seq * dim, dim, seq * dim};
}

namespace detail {
/// An allocator that starts every tensor on a 64-byte cache line and every tensor of 64 KiB or
/// more on a 4 KiB page. A std::vector's large allocations start 16 bytes into a page, so each
/// row of 64 floats straddled five lines instead of four: decoding over a [1, Lk, 8, 64] float
/// cache streamed 26.2 GB/s that way against 34.1 aligned (Lk = 32768, two threads, Sapphire
/// Rapids class, 2026-12-04; 38.3 against 44.3 at Lk = 4096). A KV pool starting on a page has
/// each block's run of a head ([num_blocks, heads, block, dim] memory: 8 or 16 KiB at block 64,
/// d = 64) span whole pages; unaligned pools ran blocks of 64 keys 1-6 % slower (docs/paged.md).
template <class T>
struct page_aligned_allocator {
  using value_type = T;
  static constexpr std::size_t page = 4096, line = 64;
  page_aligned_allocator() = default;
  template <class U>
  page_aligned_allocator(const page_aligned_allocator<U>&) noexcept {}
  static std::align_val_t alignment(std::size_t n) { return std::align_val_t(n * sizeof(T) >= 16 * page ? page : line); }
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment(n))); }
  void deallocate(T* p, std::size_t n) noexcept { ::operator delete(p, alignment(n)); }
  template <class U>
  bool operator==(const page_aligned_allocator<U>&) const noexcept { return true; }
};
}  // namespace detail

/// A contiguous [batch, seq, heads, dim] tensor that owns its memory (results, examples, tests),
/// aligned to a cache line, and to a page from 64 KiB (detail::page_aligned_allocator).
template <class Scalar>
class tensor {
 public:
  tensor() = default;
  /// Throws std::invalid_argument for a negative extent or a size that overflows.
  tensor(index_t batch, index_t seq, index_t heads, index_t dim)
      : storage_(element_count(batch, seq, heads, dim)), batch_(batch), seq_(seq), heads_(heads), dim_(dim) {}

  tensor_view<Scalar> view() noexcept { return bshd(storage_.data(), batch_, seq_, heads_, dim_); }
  tensor_view<const Scalar> view() const noexcept { return bshd(storage_.data(), batch_, seq_, heads_, dim_); }
  Scalar& operator()(index_t b, index_t s, index_t h, index_t d) noexcept { return view().row(b, s, h)[d]; }
  Scalar operator()(index_t b, index_t s, index_t h, index_t d) const noexcept { return view().row(b, s, h)[d]; }
  Scalar* data() noexcept { return storage_.data(); }
  const Scalar* data() const noexcept { return storage_.data(); }
  index_t size() const noexcept { return index_t(storage_.size()); }

 private:
  static std::size_t element_count(index_t batch, index_t seq, index_t heads, index_t dim) {
    index_t count = 1;
    for (const index_t extent : {batch, seq, heads, dim})
      if (extent < 0 || __builtin_mul_overflow(count, extent, &count) ||
          count > index_t(std::numeric_limits<std::ptrdiff_t>::max() / index_t(sizeof(Scalar))))
        throw std::invalid_argument("relbias::tensor: batch, seq, heads, dim must be >= 0 and their product fit in memory, got [" +
                                    std::to_string(batch) + ", " + std::to_string(seq) + ", " + std::to_string(heads) + ", " +
                                    std::to_string(dim) + "]");
    return std::size_t(count);
  }

  std::vector<Scalar, detail::page_aligned_allocator<Scalar>> storage_;
  index_t batch_ = 0, seq_ = 0, heads_ = 0, dim_ = 0;
};

}  // namespace relbias

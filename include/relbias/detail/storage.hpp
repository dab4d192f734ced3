#pragma once
// Storage element types of q, k, v and the KV cache, and their widening to float.
//
// The 16-bit formats are storage only: a kernel widens each element to float as it loads it and
// computes in float (products, sums, softmax). Widening is exact (every half and bfloat16 value
// is a float), so the only rounding a 16-bit cache adds is the caller's own rounding into it.
//   Eigen::half      IEEE binary16: 10 fraction bits, unit roundoff 2^-11, max 65504
//   Eigen::bfloat16  8 fraction bits, unit roundoff 2^-8, the range of float
// Widening uses Eigen's packet casts, which are the CPU's own conversions where it has them:
// F16C / AVX-512 vcvtph2ps for half, a 16-bit left shift for bfloat16 (its bits are the top half
// of a float's). Where the build has no packet of the format at float's width (SSE-only builds
// for bfloat16), a scalar loop gives the same values.

#include "relbias/offset.hpp"

#include "relbias/detail/eigen.hpp"

#include <concepts>
#include <type_traits>

namespace relbias {

/// The 16-bit storage formats the forward kernels read (attention_half.hpp).
template <class T>
concept half_storage = std::same_as<T, Eigen::half> || std::same_as<T, Eigen::bfloat16>;

/// Unit roundoff of a storage format: rounding a finite float x (in the format's normal range)
/// to T changes it by at most unit_roundoff<T>() * |x|. Half of Eigen's machine epsilon.
template <half_storage T>
constexpr float unit_roundoff() noexcept {
  return std::same_as<T, Eigen::half> ? 0x1p-11f : 0x1p-8f;
}

}  // namespace relbias

namespace relbias::detail {

/// Float packets and packets of T with as many lanes, when the build vectorises T at float's
/// width (AVX-512: Packet16f with Packet16h / Packet16bf; AVX2: Packet8f with Packet8h / Packet8bf).
template <class T>
struct widening {
  using float_packet = typename Eigen::internal::packet_traits<float>::type;
  using storage_packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr index_t size = Eigen::internal::packet_traits<float>::size;
  static constexpr bool vectorized =
      std::same_as<T, float> || (bool(Eigen::internal::packet_traits<T>::Vectorizable) &&
                                 index_t(Eigen::internal::packet_traits<T>::size) == size);

  /// size elements from any address, as floats.
  static float_packet load(const T* from) {
    if constexpr (std::same_as<T, float>) return Eigen::internal::ploadu<float_packet>(from);
    else return Eigen::internal::pcast<storage_packet, float_packet>(Eigen::internal::ploadu<storage_packet>(from));
  }
};

/// to[n] = float(from[n]) for n in [0, count), one element at a time.
template <class T>
void widen_scalar(const T* from, index_t count, float* to) {
  for (index_t n = 0; n < count; ++n) to[n] = static_cast<float>(from[n]);
}

/// to[n] = float(from[n]) for n in [0, count), in packets where the build has them; the same
/// values as widen_scalar.
template <class T>
void widen(const T* from, index_t count, float* to) {
  using w = widening<T>;
  index_t n = 0;
  if constexpr (w::vectorized)
    for (; n + w::size <= count; n += w::size) Eigen::internal::pstoreu(to + n, w::load(from + n));
  widen_scalar(from + n, count - n, to + n);
}

}  // namespace relbias::detail

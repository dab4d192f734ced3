#pragma once
// Storage element types of q, k, v and the KV cache, and their widening to float.
//
// The 16-bit formats are storage only: a kernel widens each element to float as it loads it and
// computes in float (products, sums, softmax). Widening is exact (every half and bfloat16 value
// is a float), so the only rounding a 16-bit cache adds is the caller's own rounding into it.
//   Eigen::half      IEEE binary16: 10 fraction bits, unit roundoff 2^-11, max 65504
//   Eigen::bfloat16  7 fraction bits, unit roundoff 2^-8, the range of float
// Widening uses Eigen's packet casts, which are the CPU's own conversions where it has them:
// F16C / AVX-512 vcvtph2ps for half, a 16-bit left shift for bfloat16 (its bits are the top half
// of a float's). Where the build has no packet of the format at float's width (SSE-only builds),
// a scalar loop gives the same values.

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

#if defined(__F16C__)
// Eigen 3.4.0 widens half packets with vcvtph2ps only when it defines EIGEN_HAS_FP16_C, which it
// never does under GCC (it tests defined(EIGEN_COMP_CLANG), a macro that is always defined, 0
// under GCC): its packets then widen in software, 5x slower (measured: 33 against 6 ms for 16 M
// values). These call the instruction directly wherever the compiler targets F16C.
#if defined(EIGEN_VECTORIZE_AVX512)
inline Eigen::internal::Packet16f widen_f16c(const Eigen::internal::Packet16h& h) { return _mm512_cvtph_ps(h); }
#endif
#if defined(EIGEN_VECTORIZE_AVX)
inline Eigen::internal::Packet8f widen_f16c(const Eigen::internal::Packet8h& h) { return _mm256_cvtph_ps(h); }
#endif
#endif

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
    if constexpr (std::same_as<T, float>) {
      return Eigen::internal::ploadu<float_packet>(from);
    } else {
      const storage_packet stored = Eigen::internal::ploadu<storage_packet>(from);
      if constexpr (std::same_as<T, Eigen::half> && requires { widen_f16c(stored); }) return widen_f16c(stored);
      else return Eigen::internal::pcast<storage_packet, float_packet>(stored);
    }
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

/// sum over d < n of q[d] * float(k[d]), in float: the score of one query against one stored key,
/// widened as it streams by (two packet accumulators hide the FMA latency).
template <class T>
float dot_widened(const float* q, const T* k, index_t n) {
  using w = widening<T>;
  float sum = 0;
  index_t d = 0;
  if constexpr (w::vectorized) {
    using packet = typename w::float_packet;
    packet even = Eigen::internal::pset1<packet>(0.0f), odd = even;
    for (; d + 2 * w::size <= n; d += 2 * w::size) {
      even = Eigen::internal::pmadd(Eigen::internal::ploadu<packet>(q + d), w::load(k + d), even);
      odd = Eigen::internal::pmadd(Eigen::internal::ploadu<packet>(q + d + w::size), w::load(k + d + w::size), odd);
    }
    if (d + w::size <= n) {
      even = Eigen::internal::pmadd(Eigen::internal::ploadu<packet>(q + d), w::load(k + d), even);
      d += w::size;
    }
    sum = Eigen::internal::predux(Eigen::internal::padd(even, odd));
  }
  for (; d < n; ++d) sum += q[d] * static_cast<float>(k[d]);
  return sum;
}

/// accumulator[d] += p0 * float(v0[d]) + p1 * float(v1[d]) for d < n: two stored value rows into
/// a float output row, which is loaded and stored once for both (a decoding step spends more
/// instructions on the accumulator than on the values otherwise).
template <class T>
void axpy2_widened(float p0, const T* v0, float p1, const T* v1, index_t n, float* accumulator) {
  using w = widening<T>;
  index_t d = 0;
  if constexpr (w::vectorized) {
    using packet = typename w::float_packet;
    const packet w0 = Eigen::internal::pset1<packet>(p0), w1 = Eigen::internal::pset1<packet>(p1);
    for (; d + w::size <= n; d += w::size) {
      const packet sum = Eigen::internal::pmadd(w0, w::load(v0 + d), Eigen::internal::ploadu<packet>(accumulator + d));
      Eigen::internal::pstoreu(accumulator + d, Eigen::internal::pmadd(w1, w::load(v1 + d), sum));
    }
  }
  for (; d < n; ++d) accumulator[d] = (accumulator[d] + p0 * static_cast<float>(v0[d])) + p1 * static_cast<float>(v1[d]);
}

}  // namespace relbias::detail

#pragma once
// exp over a packet, for the softmax passes of the fused kernels (the forward's exp(score - max),
// the backward's exp(score - lse)).
//
// Float packets of AVX-512 take a shorter path than Eigen's pexp (same Cephes polynomial and
// range reduction, 13 vector operations instead of about 20): the rounding of x log2(e) by the
// 1.5 * 2^23 shift instead of a floor, Horner's scheme, and 2^m applied by vscalefps instead of
// building the exponent's bits and multiplying. Measured on an Intel Xeon (Sapphire Rapids class,
// one thread): exp took 14 % of the fp32 forward's samples with pexp, 10 % with this (docs/kernels.md).
// Results: within 5 ulp of exp for x in [-87.3, 88.7] (4.6 at most, near 88.7, where m ln 2 in
// float costs most; tests/detail/test_exp.cpp), exactly 0 below -87.3365 (never a subnormal:
// exp(x) < FLT_MIN there), +inf above 88.72, NaN for NaN. Other types and targets: Eigen's pexp.

#include "relbias/detail/eigen.hpp"

#include <type_traits>

#if defined(EIGEN_VECTORIZE_AVX512)
#include <immintrin.h>
#endif

namespace relbias::detail {

#if defined(EIGEN_VECTORIZE_AVX512)
/// exp of 16 floats (AVX-512).
inline __m512 exp_avx512(__m512 x) {
  const __m512 shift = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds |t| < 2^22 to an integer
  // Below this, exp(x) < FLT_MIN (ln FLT_MIN = -87.3365): the lane is set to 0. NaN compares
  // "not less" (unordered) and stays.
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3365f), _CMP_NLT_UQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.8f), x);  // exp overflows from 88.73 on; min returns x when x is NaN
  const __m512 m = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shift), shift);  // round(x / ln 2)
  const __m512 r = _mm512_fmadd_ps(m, _mm512_set1_ps(-0.6931471805599453f), x);                             // |r| <= ln 2 / 2
  // exp(r) = 1 + r + r^2 P(r), Cephes' P of degree 5, by Horner.
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  const __m512 one = _mm512_set1_ps(1.0f);
  p = _mm512_fmadd_ps(_mm512_fmadd_ps(p, r, one), r, one);
  return _mm512_maskz_scalef_ps(kept, p, m);  // p 2^m, rounded once; overflow gives +inf
}
#endif

/// exp of each lane of a packet of S (Eigen's widest packet of S).
template <class S>
inline typename Eigen::internal::packet_traits<S>::type packet_exp(const typename Eigen::internal::packet_traits<S>::type& x) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<S, float>) return exp_avx512(x);
  else
#endif
    return Eigen::internal::pexp(x);
}

}  // namespace relbias::detail

#pragma once
// Intel AMX (Advanced Matrix Extensions) for the bf16 forward and backward (amx_forward.hpp,
// amx_backward.hpp): the only file with AMX intrinsics, and with the AVX-512 intrinsics of those
// paths' row passes (softmax, its backward, the bf16 roundings).
//
// Every function that uses them is compiled for those instructions by a target attribute, not
// by the build's flags: a build without -mamx-tile (or -march=native on an older machine) still
// compiles them, and they run only after detection (usable()) found the CPU and the kernel ready.
// A compiler without AMX intrinsics (GCC < 11, Clang < 12, non-x86) gets the portable stubs at
// the bottom: usable() is false there and the callers take the widening path.
//
// Detection, once per process (Intel SDM vol. 1 ch. 13 and 18; Linux Documentation/arch/x86/xstate.rst):
//   - CPUID leaf 7: EDX bit 24 AMX-TILE, bit 22 AMX-BF16; EBX bits 16, 30, 31 AVX-512 F, BW, VL;
//     leaf 7 subleaf 1 EAX bit 5 AVX512_BF16 (the softmax's float -> bf16 rounding);
//   - XCR0 (xgetbv): the OS saves the ZMM (bits 5-7) and tile (bits 17, 18) states;
//   - Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18) grants this process the
//     8 KiB tile state (without it the first tile instruction is a SIGILL); the grant covers every
//     thread of the process.
// The environment variable RELBIAS_NO_AMX (set to anything but "0" or "") turns the path off for
// the whole process, and set_disabled() within it (tests compare both paths in one run).
//
// Tiles: every tile here is 16 rows of 64 bytes (palette 1), one configuration for everything:
//   C: 16 x 16 floats;  A: 16 rows x 32 bf16;  B: 16 "pair rows" x 16 columns x 2 bf16, the VNNI
//   layout: B row kk holds (B[2kk][n], B[2kk+1][n]) for n < 16, so that tdpbf16ps computes
//   C[m][n] += sum over kk of A[m][2kk] B[2kk][n] + A[m][2kk+1] B[2kk+1][n] in float.

#include "relbias/detail/eigen.hpp"

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    (__has_include(<amxtileintrin.h>) || __has_include(<amxintrin.h>))
#if defined(__GNUC__) && !defined(__clang__)  // GCC 12's AVX-512 headers (GCC bug 105593), as eigen.hpp
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace relbias::detail::amx {

/// This build has the AMX code (the CPU may still lack AMX: usable()).
inline constexpr bool compiled = true;

/// Palette 1, tiles 0-7 of 16 rows x 64 bytes (LDTILECFG's 64-byte operand). A constant with
/// static storage: GCC's _tile_loadconfig tells the compiler it reads 8 bytes, so the other 56
/// must never be stores the compiler could drop.
struct alignas(64) tile_config {
  std::uint8_t palette_id;
  std::uint8_t start_row;
  std::uint8_t reserved[14];
  std::uint16_t bytes_per_row[16];
  std::uint8_t rows[16];
};
inline constexpr tile_config all_tiles_16x64{1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

/// The CPU and the OS support AMX-BF16 with AVX-512 F/BW/VL/BF16, and Linux granted the tile state.
inline bool detect() noexcept {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(1, 0, a, b, c, d);
  if (!((c >> 27) & 1u)) return false;  // OSXSAVE: xgetbv is allowed
  __cpuid_count(7, 0, a, b, c, d);
  const bool tile = (d >> 24) & 1u, bf16_tiles = (d >> 22) & 1u;
  const bool avx512 = ((b >> 16) & 1u) && ((b >> 30) & 1u) && ((b >> 31) & 1u);
  __cpuid_count(7, 1, a, b, c, d);
  const bool avx512_bf16 = (a >> 5) & 1u;
  if (!tile || !bf16_tiles || !avx512 || !avx512_bf16) return false;
  unsigned xcr0_low = 0, xcr0_high = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0u));
  constexpr unsigned zmm_states = 0xe0u | 0x6u, tile_states = 3u << 17;  // opmask, ZMM, SSE, AVX; XTILECFG, XTILEDATA
  if ((xcr0_low & zmm_states) != zmm_states || (xcr0_low & tile_states) != tile_states) return false;
  constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;  // <asm/prctl.h>, arch/x86/include/asm/fpu/types.h
  return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
}

#else  // no AMX intrinsics in this compiler, or not x86-64 Linux: the portable fallback

namespace relbias::detail::amx {

inline constexpr bool compiled = false;
inline bool detect() noexcept { return false; }

#endif

/// RELBIAS_NO_AMX set to anything but "" or "0".
inline bool disabled_by_environment() noexcept {
  const char* value = std::getenv("RELBIAS_NO_AMX");
  return value && *value && std::strcmp(value, "0") != 0;
}

/// Detected once per process (the arch_prctl call included).
inline bool detected() noexcept {
  static const bool result = detect();
  return result;
}

inline std::atomic<bool>& disabled_flag() noexcept {
  static std::atomic<bool> flag{disabled_by_environment()};
  return flag;
}

/// Turns the AMX path off (true) or back on for the rest of the process; for tests and
/// benchmarks that compare both paths. Starts as RELBIAS_NO_AMX says.
inline void set_disabled(bool disabled) noexcept { disabled_flag().store(disabled); }

/// The bf16 forward and backward run on AMX: compiled in, detected, not disabled.
inline bool usable() noexcept { return compiled && !disabled_flag().load() && detected(); }

}  // namespace relbias::detail::amx

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    (__has_include(<amxtileintrin.h>) || __has_include(<amxintrin.h>))

namespace relbias::detail::amx {

// GCC's tile intrinsics are asm statements without memory operands: the empty asm with a memory
// clobber at entry and exit keeps the compiler from moving the caller's loads and stores across
// them once the function is inlined (a -march=native build on an AMX machine may inline it).

/// Loads the 16 x 64-byte configuration on this thread: before the first tile instruction of a
/// work item.
__attribute__((target("amx-tile"))) inline void configure() noexcept {
  _tile_loadconfig(&all_tiles_16x64);
  __asm__ volatile("" ::: "memory");
}

/// Returns the tile state to its initial (unused) state: after a work item, so that the thread
/// does not carry 8 KiB of tile state through context switches.
__attribute__((target("amx-tile"))) inline void release() noexcept {
  __asm__ volatile("" ::: "memory");
  _tile_release();
}

/// out[32 rows][32 chunks] (floats, out_stride floats apart) = Q K^T over `chunks` chunks of 32 keys.
///   q: 32 rows of d_chunks * 32 bf16, q_stride elements apart (rows past the real ones zero);
///   k: packed keys (pack_keys): per 16 keys, d_chunks * 16 pair rows of 16 keys x 2 bf16;
///      chunk t's two 16-key halves start at k + t * 32 * 32 * d_chunks and 16 * 32 * d_chunks later.
/// Tiles: C 0-3 (2 x 2 blocks of 16 x 16), A 4-5 (the two 16-row halves), B 6-7 (the two key halves).
__attribute__((target("amx-tile,amx-bf16"))) inline void scores(const std::uint16_t* q, std::ptrdiff_t q_stride,
                                                                const std::uint16_t* k, std::ptrdiff_t d_chunks,
                                                                std::ptrdiff_t chunks, float* out, std::ptrdiff_t out_stride) noexcept {
  __asm__ volatile("" ::: "memory");
  const std::ptrdiff_t half = 16 * 32 * d_chunks, q_bytes = q_stride * 2, out_bytes = out_stride * 4;
  const std::uint16_t* q_low = q + 16 * q_stride;
  for (std::ptrdiff_t t = 0; t < chunks; ++t) {
    const std::uint16_t* keys = k + 2 * half * t;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (std::ptrdiff_t c = 0; c < d_chunks; ++c) {
      _tile_loadd(4, q + 32 * c, q_bytes);
      _tile_loadd(5, q_low + 32 * c, q_bytes);
      _tile_loadd(6, keys + 512 * c, 64);
      _tile_loadd(7, keys + half + 512 * c, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    float* o = out + 32 * t;
    _tile_stored(0, o, out_bytes);
    _tile_stored(1, o + 16, out_bytes);
    _tile_stored(2, o + 16 * out_stride, out_bytes);
    _tile_stored(3, o + 16 * out_stride + 16, out_bytes);
  }
  __asm__ volatile("" ::: "memory");
}

/// acc[halves * 16 rows][v_tiles * 16] (floats, acc_stride apart) += P V over `chunks` chunks of 32 keys.
///   p: bf16 probabilities, p_stride elements apart, chunk t at p + 32 t;
///   v: packed values (pack_values): per 32 keys, 16 pair rows of v_tiles * 16 columns x 2 bf16.
/// Only the column tiles [first_tile, end_tile) (a caller interleaves the pairs with other work).
/// halves: 1 or 2 (16 or 32 rows). Tiles: C 0-3 (2 x 2 blocks: two row halves, two column
/// tiles), A 4-5 (P of the two halves), B 6-7 (two column tiles): 4 loads per 4 products.
__attribute__((target("amx-tile,amx-bf16"))) inline void values(const std::uint16_t* p, std::ptrdiff_t p_stride,
                                                                const std::uint16_t* v, std::ptrdiff_t v_tiles,
                                                                std::ptrdiff_t first_tile, std::ptrdiff_t end_tile,
                                                                std::ptrdiff_t chunks, int halves, float* acc,
                                                                std::ptrdiff_t acc_stride) noexcept {
  __asm__ volatile("" ::: "memory");
  const std::ptrdiff_t v_row = 32 * v_tiles, chunk = 16 * v_row, v_bytes = v_row * 2, acc_bytes = acc_stride * 4, p_bytes = p_stride * 2;
  const bool low = halves > 1;
  float* acc_low = acc + 16 * acc_stride;
  const std::uint16_t* p_low = p + 16 * p_stride;
  for (std::ptrdiff_t j = first_tile; j < end_tile; j += 2) {
    const bool pair = j + 1 < end_tile;
    float* c = acc + 16 * j;
    float* c_low = acc_low + 16 * j;
    _tile_loadd(0, c, acc_bytes);
    if (pair) _tile_loadd(1, c + 16, acc_bytes);
    if (low) _tile_loadd(2, c_low, acc_bytes);
    if (low && pair) _tile_loadd(3, c_low + 16, acc_bytes);
    for (std::ptrdiff_t t = 0; t < chunks; ++t) {
      const std::uint16_t* b = v + t * chunk + 32 * j;
      _tile_loadd(4, p + 32 * t, p_bytes);
      _tile_loadd(6, b, v_bytes);
      _tile_dpbf16ps(0, 4, 6);
      if (pair) {
        _tile_loadd(7, b + 32, v_bytes);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (low) {
        _tile_loadd(5, p_low + 32 * t, p_bytes);
        _tile_dpbf16ps(2, 5, 6);
        if (pair) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, c, acc_bytes);
    if (pair) _tile_stored(1, c + 16, acc_bytes);
    if (low) _tile_stored(2, c_low, acc_bytes);
    if (low && pair) _tile_stored(3, c_low + 16, acc_bytes);
  }
  __asm__ volatile("" ::: "memory");
}

/// Lanes [0, n) of a 16-lane mask, n in [0, 16].
inline __mmask16 first_lanes(std::ptrdiff_t n) noexcept { return __mmask16((1u << unsigned(n)) - 1u); }

/// x[c] = x[c] * scale + bias[c] (bias null: 0) for c < n, in place; returns the largest x
/// (-inf for n = 0). A NaN may be dropped from the maximum; exp_to_bf16 passes it on.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float scale_bias_max(float* x, std::ptrdiff_t n, float scale,
                                                                                 const float* bias) noexcept {
  const __m512 s = _mm512_set1_ps(scale);
  __m512 m = _mm512_set1_ps(-__builtin_inff());
  std::ptrdiff_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 y = bias ? _mm512_fmadd_ps(_mm512_loadu_ps(x + c), s, _mm512_loadu_ps(bias + c)) : _mm512_mul_ps(_mm512_loadu_ps(x + c), s);
    _mm512_storeu_ps(x + c, y);
    m = _mm512_max_ps(m, y);
  }
  if (c < n) {
    const __mmask16 lanes = first_lanes(n - c);
    const __m512 raw = _mm512_maskz_loadu_ps(lanes, x + c);
    const __m512 y = bias ? _mm512_fmadd_ps(raw, s, _mm512_maskz_loadu_ps(lanes, bias + c)) : _mm512_mul_ps(raw, s);
    _mm512_mask_storeu_ps(x + c, lanes, y);
    m = _mm512_mask_max_ps(m, lanes, m, y);
  }
  return _mm512_reduce_max_ps(m);
}

/// exp(x) in 16 lanes for x <= 0: x = n ln 2 + r with n rounded to nearest by the 1.5 * 2^23
/// trick, |r| <= ln 2 / 2, e^r by a degree-5 polynomial fitted for least maximum relative error
/// (1.35e-7 on that interval; with the constant term set to 1, so that exp(0) = 1, and float
/// evaluation: within 3e-7 of e^x, tested); exactly 0 below -110 and for -inf, NaN for NaN
/// (vmaxps returns its second operand when one is NaN).
__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) noexcept {
  const __m512 round = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds |t| < 2^22 to an integer
  x = _mm512_max_ps(_mm512_set1_ps(-110.0f), x);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), round), round);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 = 0.693359375 - 2.12194440e-4 (Cephes)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(0.008297654800117016f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.04191538318991661f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16667574644088745f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49998894333839417f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.9999997019767761f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));  // the fit gives 1 + 2^-23; 1 keeps exp(0) = 1 exactly
  return _mm512_scalef_ps(p, n);
}

/// max over c < n of x[c] * scale + bias[c] (bias null: 0), without storing it (-inf for n =
/// 0); a NaN may be dropped, as in scale_bias_max.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float scaled_max(const float* x, std::ptrdiff_t n, float scale,
                                                                             const float* bias) noexcept {
  const __m512 s = _mm512_set1_ps(scale);
  __m512 m = _mm512_set1_ps(-__builtin_inff());
  for (std::ptrdiff_t c = 0; c < n; c += 16) {
    const __mmask16 lanes = n - c >= 16 ? __mmask16(0xffff) : first_lanes(n - c);
    const __m512 raw = _mm512_maskz_loadu_ps(lanes, x + c);
    const __m512 y = bias ? _mm512_fmadd_ps(raw, s, _mm512_maskz_loadu_ps(lanes, bias + c)) : _mm512_mul_ps(raw, s);
    m = _mm512_mask_max_ps(m, lanes, m, y);
  }
  return _mm512_reduce_max_ps(m);
}

/// The forward's exp error bound: exp2_16 below is within this relative error of 2^t (tested),
/// the e of the accuracy bound in docs/storage.md.
inline constexpr double forward_exp_error = 1e-4;

/// 2^t in 16 lanes: t = floor(t) + f, f in [0, 1) by vreduceps, 2^f by a cubic fitted for least
/// maximum relative error with the constant term 1 (8.6e-5 in float evaluation: P is rounded to
/// bf16, u = 2^-8 relative, right after, so more digits would be lost there; the row sum and lse
/// see 8.6e-5, in the bound), times 2^floor(t) by vscalefps. Exactly 1 at t = 0, 0 below -150
/// and at -inf (vreduceps gives f = 0 there, vscalefps 0: no clamp needed), NaN for NaN (tested).
__attribute__((target("avx512f,avx512dq"))) inline __m512 exp2_16(__m512 t) noexcept {
  const __m512 f = _mm512_reduce_ps(t, 0x09);  // imm: keep 0 fraction bits, round down, no precision exception
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.07706724107265472f), f, _mm512_set1_ps(0.22764497995376587f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6951166391372681f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, t);  // p 2^floor(t)
}

/// The base-2 exponent of 16 scores x: (x s + bias) log2 e + shift with a bias, x s + shift
/// without (s then holds scale log2 e), shift = -(row maximum) log2 e.
template <bool WithBias>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16"))) inline __m512 exponent16(__m512 x, const float* bias,
                                                                                                 __mmask16 lanes, __m512 s, __m512 shift) noexcept {
  constexpr float log2e = 1.44269504088896341f;
  if constexpr (WithBias) return _mm512_fmadd_ps(_mm512_fmadd_ps(x, s, _mm512_maskz_loadu_ps(lanes, bias)), _mm512_set1_ps(log2e), shift);
  else return _mm512_fmadd_ps(x, s, shift);
}

/// The forward's softmax pass over one row of a score block, in registers (x is not written):
/// y = x[c] scale + bias[c], t = (y - shift) log2 e, out[c] = bf16(2^t) rounded to nearest even
/// (vcvtne2ps2bf16), for c < n; returns the float sum of the unrounded 2^t. bias is not read
/// without WithBias.
template <bool WithBias>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16"))) inline float exp_to_bf16_impl(const float* x, std::ptrdiff_t n,
                                                                                                     float scale, const float* bias,
                                                                                                     float shift, std::uint16_t* out) noexcept {
  constexpr float log2e = 1.44269504088896341f;
  // Without a bias, scale and log2 e fold into one multiplier: one FMA per lane before exp2.
  const __m512 s = _mm512_set1_ps(WithBias ? scale : scale * log2e), sh = _mm512_set1_ps(-shift * log2e);
  const __mmask16 all = 0xffff;
  __m512 sum = _mm512_setzero_ps();
  std::ptrdiff_t c = 0;
  for (; c + 32 <= n; c += 32) {  // two packets, one conversion of both
    const __m512 t0 = exponent16<WithBias>(_mm512_loadu_ps(x + c), bias + c, all, s, sh);
    const __m512 t1 = exponent16<WithBias>(_mm512_loadu_ps(x + c + 16), bias + c + 16, all, s, sh);
    const __m512 e0 = exp2_16(t0), e1 = exp2_16(t1);
    sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
    const __m512bh rounded = _mm512_cvtne2ps_pbh(e1, e0);
    std::memcpy(out + c, &rounded, sizeof(rounded));
  }
  for (; c < n; c += 16) {  // one packet, the last one masked
    const __mmask16 lanes = n - c >= 16 ? all : first_lanes(n - c);
    const __m512 t = exponent16<WithBias>(_mm512_maskz_loadu_ps(lanes, x + c), bias + c, lanes, s, sh);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp2_16(t));
    sum = _mm512_add_ps(sum, e);
    const __m256bh rounded = _mm512_cvtneps_pbh(e);
    __m256i bits;
    std::memcpy(&bits, &rounded, sizeof(bits));
    _mm256_mask_storeu_epi16(out + c, lanes, bits);
  }
  return _mm512_reduce_add_ps(sum);
}

/// exp(x[c] scale + bias[c] - shift) (bias null: 0) for c < n, rounded to bf16 into out; returns
/// their float sum (unrounded, in a fixed order). shift is the row's running maximum or a
/// reference below it (the caller checks the sum).
inline float exp_to_bf16(const float* x, std::ptrdiff_t n, float scale, const float* bias, float shift, std::uint16_t* out) noexcept {
  // Without a bias, x stands in for it: never read, but no offset is ever added to a null pointer.
  return bias ? exp_to_bf16_impl<true>(x, n, scale, bias, shift, out) : exp_to_bf16_impl<false>(x, n, scale, x, shift, out);
}

/// The backward's row pass over n visible columns, in place: x[c] = P = exp(x[c] scale + bias[c]
/// - lse) (bias null: 0; exp16: within 3e-7 of exp, 0 at -inf), dp[c] = dS = P (dp[c] - delta).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void probabilities_and_gradient(float* x, float* dp, std::ptrdiff_t n,
                                                                                             float scale, const float* bias, float lse,
                                                                                             float delta) noexcept {
  const __m512 s = _mm512_set1_ps(scale), l = _mm512_set1_ps(lse), d = _mm512_set1_ps(delta);
  for (std::ptrdiff_t c = 0; c < n; c += 16) {
    const __mmask16 lanes = n - c >= 16 ? __mmask16(0xffff) : first_lanes(n - c);
    const __m512 raw = _mm512_maskz_loadu_ps(lanes, x + c);
    const __m512 y = bias ? _mm512_fmadd_ps(raw, s, _mm512_maskz_loadu_ps(lanes, bias + c)) : _mm512_mul_ps(raw, s);
    const __m512 p = exp16(_mm512_sub_ps(y, l));
    _mm512_mask_storeu_ps(x + c, lanes, p);
    _mm512_mask_storeu_ps(dp + c, lanes, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, dp + c), d)));
  }
}

/// out[2c] = bf16(even[c]), out[2c + 1] = bf16(odd[c]) for c < n (a multiple of 16), nearest
/// even: two rows of a matrix as one pair row of a B operand whose depth runs down the rows (the
/// VNNI layout of the file's header), as the backward's P and dS for dV and dK. even_out and
/// odd_out (or null) get the two rows as they are, in bf16 (dS as the A operand of dQ).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void to_bf16_pairs(const float* even, const float* odd,
                                                                                         std::ptrdiff_t n, std::uint16_t* out,
                                                                                         std::uint16_t* even_out = nullptr,
                                                                                         std::uint16_t* odd_out = nullptr) noexcept {
  alignas(64) static constexpr std::uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(order);
  for (std::ptrdiff_t c = 0; c < n; c += 16) {
    const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(odd + c), _mm512_loadu_ps(even + c));  // even in lanes 0-15
    __m512i bits;
    std::memcpy(&bits, &both, sizeof(bits));
    _mm512_storeu_si512(out + 2 * c, _mm512_permutexvar_epi16(interleave, bits));
    if (even_out) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(even_out + c), _mm512_castsi512_si256(bits));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(odd_out + c), _mm512_extracti64x4_epi64(bits, 1));
    }
  }
}

/// One 16-key block of pack_keys (amx_forward.hpp): lane n of pair row kk (64 bytes at out +
/// 32 kk) gets the 32-bit pair (dimensions 2kk, 2kk + 1) of key n, for kk < pairs and n < count
/// (count <= 16, rows `stride` elements apart; the other lanes are written as zeros). Two gathers
/// of 8 keys per pair row (64-bit offsets: any stride), instead of 16 scalar copies into 16 lines.
__attribute__((target("avx512f,avx512dq"))) inline void pack_key_block(const std::uint16_t* rows, std::ptrdiff_t stride, std::ptrdiff_t count,
                                                              std::ptrdiff_t pairs, std::uint16_t* out) noexcept {
  const unsigned lanes = first_lanes(std::min<std::ptrdiff_t>(count, 16));
  const __mmask8 low = __mmask8(lanes & 0xffu), high = __mmask8(lanes >> 8);
  const __m512i first = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(stride));  // in bf16 elements: scale 2
  const __m512i second = _mm512_add_epi64(first, _mm512_set1_epi64(8 * stride));
  for (std::ptrdiff_t kk = 0; kk < pairs; ++kk) {
    const __m256i a = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), low, first, rows + 2 * kk, 2);
    const __m256i b = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), high, second, rows + 2 * kk, 2);
    _mm512_storeu_si512(out + 32 * kk, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
  }
}

/// One pair row of pack_values: out[2n] = even[n], out[2n + 1] = odd[n] (odd null: 0) for
/// n < columns, 16 columns (32 elements) per store: out must hold 2 columns rounded up to 16,
/// and gets zeros past 2 columns.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void pack_value_pair(const std::uint16_t* even, const std::uint16_t* odd,
                                                                                std::ptrdiff_t columns, std::uint16_t* out) noexcept {
  alignas(64) static constexpr std::uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(order);
  for (std::ptrdiff_t n = 0; n < columns; n += 16) {
    const __mmask16 lanes = columns - n >= 16 ? __mmask16(0xffff) : first_lanes(columns - n);
    const __m256i low = _mm256_maskz_loadu_epi16(lanes, even + n);
    const __m256i high = odd ? _mm256_maskz_loadu_epi16(lanes, odd + n) : _mm256_setzero_si256();
    _mm512_storeu_si512(out + 2 * n, _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1)));
  }
}

/// The tile units' peak, for the benchmarks (bench/peak.hpp): `rounds` rounds of 4 independent
/// tdpbf16ps on tiles loaded once (16 x 16 x 32 multiply-adds each, no memory traffic); returns
/// the FLOPs done. Needs configure() on this thread first.
__attribute__((target("amx-tile,amx-bf16"))) inline double tile_product_rounds(long rounds) noexcept {
  alignas(64) static const std::uint16_t ones[16 * 32] = {};  // zeros: the products' values do not matter
  alignas(64) float sink[16 * 16];
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (long n = 0; n < rounds; ++n) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, sink, 64);
  __asm__ volatile("" : : "r"(sink) : "memory");
  return 4.0 * 2 * 16 * 16 * 32 * double(rounds);
}

}  // namespace relbias::detail::amx

#else

namespace relbias::detail::amx {

// Never called (usable() is false): they keep the callers compiling everywhere.
inline void configure() noexcept {}
inline void release() noexcept {}
inline void scores(const std::uint16_t*, std::ptrdiff_t, const std::uint16_t*, std::ptrdiff_t, std::ptrdiff_t, float*, std::ptrdiff_t) noexcept {}
inline void values(const std::uint16_t*, std::ptrdiff_t, const std::uint16_t*, std::ptrdiff_t, std::ptrdiff_t, std::ptrdiff_t,
                   std::ptrdiff_t, int, float*, std::ptrdiff_t) noexcept {}
inline float scale_bias_max(float*, std::ptrdiff_t, float, const float*) noexcept { return 0.0f; }
inline constexpr double forward_exp_error = 1e-4;
inline float scaled_max(const float*, std::ptrdiff_t, float, const float*) noexcept { return 0.0f; }
inline float exp_to_bf16(const float*, std::ptrdiff_t, float, const float*, float, std::uint16_t*) noexcept { return 0.0f; }
inline double tile_product_rounds(long) noexcept { return 0.0; }
inline void pack_key_block(const std::uint16_t*, std::ptrdiff_t, std::ptrdiff_t, std::ptrdiff_t, std::uint16_t*) noexcept {}
inline void pack_value_pair(const std::uint16_t*, const std::uint16_t*, std::ptrdiff_t, std::uint16_t*) noexcept {}
inline void probabilities_and_gradient(float*, float*, std::ptrdiff_t, float, const float*, float, float) noexcept {}
inline void to_bf16_pairs(const float*, const float*, std::ptrdiff_t, std::uint16_t*, std::uint16_t* = nullptr,
                          std::uint16_t* = nullptr) noexcept {}

}  // namespace relbias::detail::amx

#endif

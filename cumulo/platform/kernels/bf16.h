// bf16 <-> fp32 for every CPU kernel here. bf16 is the top half of an fp32: widening is a shift (exact), and
// narrowing is the one rounding below. Values travel as uint16_t bit patterns.
//
// The rounding, everywhere (scalar and vector): to nearest even; subnormals kept, never flushed; NaN stays
// NaN with its sign, quieted (bit 6 set). That is torch's .to(bfloat16) for every number, so dequantized
// weights are bit-equal to the reference's, and it is what vcvtneps2bf16 returns for every input but
// subnormals, which the instruction flushes to zero: store16 rounds those lanes in integers instead, so the
// vector and scalar forms agree bit for bit. (torch writes NaN as 0x7FC0 or 0xFFFF depending on its code path;
// no test or caller relies on a NaN's bits, only on NaN staying NaN.)
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace cumulo_bf16 {

inline float to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Element access for kernels templated on the storage type (float or bf16 bits).
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = from_float(v); }

#if defined(__x86_64__) || defined(__i386__)
// 16 fp32 -> bf16 at out (the lanes in mask m), rounded as from_float: subnormal lanes in integers, every
// other lane (NaN included) by vcvtneps2bf16, whose result there is from_float's.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void store16(uint16_t* out, __m512 v,
                                                                                   __mmask16 m) {
    const __m512 mag = _mm512_abs_ps(v);
    const __mmask16 sub = _mm512_cmp_ps_mask(mag, _mm512_set1_ps(0x1p-126f), _CMP_LT_OQ) &
                          _mm512_cmp_ps_mask(mag, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    if (!sub) {
        _mm256_mask_storeu_epi16(out, m, (__m256i)_mm512_cvtneps_pbh(v));
        return;
    }
    const __m512i u = _mm512_castps_si512(v);  // the bit pattern, rounded in integers (for the subnormal lanes)
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    const __m512i fast = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v));
    _mm512_mask_cvtepi32_storeu_epi16(out, m, _mm512_mask_blend_epi32(sub, fast, rounded));
}
#endif

}  // namespace cumulo_bf16

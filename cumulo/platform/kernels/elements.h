// Element decodes of the format kernels (fp8.cpp, fp4.cpp, lut.cpp): every way an E4M3, E2M1 or E8M0 code
// becomes a number in C++ is here, one function per instruction set and output form, each checked against the
// scalar definitions at the top (the tests compare every kernel with the reference dequantization).
//
// E4M3 (FP8), sign | 4 exponent bits (bias 7) | 3 mantissa bits; 0x7F and 0xFF are NaN:
//   e4m3_value            the definition (scalar tails, tables)
//   e4m3x8_f32            AVX2: 8 codes -> fp32 times 2^-120, by moving the bits into fp32's fields (3 integer
//                         ops; subnormals map to subnormals); the 2^120 goes into the block scale (E4M3Scale)
//   e4m3x16_fp16          AVX-512: 16 codes -> fp32 times 2^-8, through fp16 (vcvtph2ps); products stay normal
//   e4m3x16_f32_nan       AVX-512: as e4m3x8_f32 for 16 codes, NaN codes NaN (the dequantizers)
//   Table8Bf16            AVX512-BF16 + VBMI: 64 codes -> exact bf16 by byte-table lookup (vpermi2b); also
//                         any 8-bit element whose magnitudes are exact in bf16 (HiF8, MX INT8)
// The fused product kernels never see NaN codes (weights hold none) and do not honour them; the dequantizers do.
// E2M1 (FP4): kE2M1 (values), e2m1x32_f32 (AVX2, 2 x value via pshufb), kE2M1Bf16 (bf16 bytes for vpshufb).
// E8M0 (MX block scales): e8m0_value, the code placed in fp32's exponent field.
// NVFP4 and MXFP6 with bf16 x (AVX512-BF16 + VBMI), 32 elements in element order as exact bf16 per call:
//   nvfp4x32_bf16         16 bytes of E2M1 times their two E4M3 block scales (at most 5 significant bits)
//   fp6x32_bf16           24 bytes of 6-bit codes (E2M3 or E3M2, four per 24-bit word) through Fp6Bf16's table
// Built with -mavx2 -mfma -mf16c (x86 only); the AVX-512 functions carry their own target attributes and run
// only where cumulo_cpu (cpu_features.h) says the CPU has them.
#pragma once

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

namespace cumulo_elements {

inline float e4m3_value(uint8_t c) {
    int s = c >> 7, e = (c >> 3) & 0xF, m = c & 7;
    if (e == 15 && m == 7) return NAN;
    float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + m / 8.0f, e - 7);
    return s ? -v : v;
}

const float kE2M1[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};

// E8M0 -> float by placing the code in fp32's exponent field; code 0 (2^-127) is an fp32 subnormal.
inline float e8m0_value(uint8_t c) {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = c == 0 ? 0x00400000u : c == 0xFF ? 0x7FC00000u : (uint32_t)c << 23;
    return v.f;
}

// 8 E4M3 codes -> 8 floats, each 2^-120 times its value. Sign-extending the byte to 32 bits and shifting left
// by 20 puts the sign at bit 31 and exponent+mantissa at bits 26..20; the mask clears the sign's copies in bits
// 30..27. (An F16C variant, via fp16 and vcvtph2ps, measured ~10% slower on AMD EPYC.)
inline __m256 e4m3x8_f32(const uint8_t* p) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32((int)0x87F00000)));
}

// The block scale times 2^120 (see e4m3x8_f32), kept finite: scales above 2^7 take a second multiply.
struct E4M3Scale {
    __m256 a, b;
    bool two;
    explicit E4M3Scale(float s) {
        two = !(s <= 128.0f);
        a = _mm256_set1_ps(two ? s : s * 0x1p120f);
        b = _mm256_set1_ps(0x1p120f);
    }
    inline __m256 apply(__m256 w) const {
        w = _mm256_mul_ps(w, a);
        return two ? _mm256_mul_ps(w, b) : w;
    }
};

// 16 E4M3 codes (the lanes in m; the others 0) -> 16 floats, each 2^-8 times its value. Sign-extending a code
// to 16 bits, shifting left by 7 and masking with 0xBF80 gives the fp16 whose value is the E4M3 value times
// 2^-8, subnormals included (both formats' subnormal steps line up); vcvtph2ps widens 16 at once.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 e4m3x16_fp16(const uint8_t* p, __mmask16 m) {
    const __m256i h = _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(m, p));
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80)));
}

// 16 E4M3 codes (the lanes in m) as fp32 times 2^-120: the sign to bit 31, exponent and mantissa to bits
// 26..20 (subnormals map to subnormals); codes 0x7F and 0xFF are NaN, as in the reference.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 e4m3x16_f32_nan(const uint8_t* p,
                                                                                   __mmask16 m) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p));
    const __m512i mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7F));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24);
    const __m512 v = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_slli_epi32(mag, 20)));
    return _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)), v,
                                _mm512_set1_ps(__builtin_nanf("")));
}

// 8-bit codes -> exact bf16 (AVX512-BF16 + VBMI). Per 64 codes: two vpermi2b lookups (the low and the high
// byte of the bf16 of the code's magnitude, 128-entry tables in four registers), the sign OR-ed into the high
// byte, and two byte unpacks that interleave them into 2 x 32 bf16. The unpacks work within 128-bit lanes, so
// the values come out in a fixed lane order: the kernels permute x into the same order once per call.
struct Table8Bf16 {
    __m512i lo0, lo1, hi0, hi1;
    bool twos;  // codes are two's complement integers (MX INT8): looked up by |code|, sign from bit 7
};

// The tables for E4M3 (mags null) or any 8-bit element whose 128 magnitudes are exact in bf16 and whose bit 7
// is the sign (HiF8), or two's complement integers (twos: MX INT8, whose codes never hold -128). NaN and Inf
// codes, which weights never hold, become 0.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline Table8Bf16 make_table8_bf16(
    const float* mags = nullptr, bool twos = false) {
    alignas(64) uint8_t lo[128], hi[128];
    for (int c = 0; c < 128; ++c) {
        float v = mags ? mags[c] : e4m3_value((uint8_t)c);
        if (!isfinite(v)) v = 0.0f;
        uint32_t u;
        memcpy(&u, &v, 4);
        lo[c] = (uint8_t)(u >> 16);
        hi[c] = (uint8_t)(u >> 24);
    }
    return {_mm512_load_si512(lo), _mm512_load_si512(lo + 64), _mm512_load_si512(hi), _mm512_load_si512(hi + 64),
            twos};
}

// 64 loaded codes s -> 2 x 32 bf16 in the tables' lane order.
__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512bf16"))) inline void table8_bf16_64(
    __m512i s, const Table8Bf16& t, __m512i& w0, __m512i& w1) {
    const __m512i c = t.twos ? _mm512_abs_epi8(s) : s;
    const __m512i lo = _mm512_permutex2var_epi8(t.lo0, c, t.lo1);
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.hi0, c, t.hi1), s,
                                                 _mm512_set1_epi8((char)0x80), 0xF8);  // a | (b & c)
    w0 = _mm512_unpacklo_epi8(lo, hi);
    w1 = _mm512_unpackhi_epi8(lo, hi);
}

// 16 bytes of packed E2M1 (element 0 in the low nibble) -> 32 floats, each 2 times its value (the 1/2 goes
// into the E8M0 block scale).
inline void e2m1x32_f32(const uint8_t* p, __m256 w[4]) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i low = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, low));
    __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), low));
    __m128i a = _mm_unpacklo_epi8(lo, hi), c = _mm_unpackhi_epi8(lo, hi);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)));
}

// The low and high bytes of the bf16 of each E2M1 code, repeated in each 128-bit lane (for vpshufb).
struct E2M1Bf16Bytes {
    alignas(64) uint8_t lo[64];
    alignas(64) uint8_t hi[64];
    E2M1Bf16Bytes() {
        for (int c = 0; c < 64; ++c) {
            const float v = kE2M1[c & 15];
            uint32_t u;
            memcpy(&u, &v, 4);
            lo[c] = (uint8_t)(u >> 16);
            hi[c] = (uint8_t)(u >> 24);
        }
    }
};
const E2M1Bf16Bytes kE2M1Bf16;

#define CUMULO_ELEMENTS_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")))

// NVFP4: 16 bytes of packed E2M1 (32 codes, element 0 in the low nibble) -> 32 bf16 of value x block scale, s0
// for elements 0..15 and s1 for 16..31 (E4M3 values). E2M1 has at most 2 significant bits and E4M3 4, so the
// fp32 product has at most 5 and lies in 2^-10 .. 2688: exact in bf16, a normal number or zero.
CUMULO_ELEMENTS_BF16 inline __m512i nvfp4x32_bf16(const uint8_t* p, float s0, float s1) {
    const __m512 table = _mm512_loadu_ps(kE2M1);
    const __m512i even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)), table);
    const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
    const __m512 lo = _mm512_mul_ps(_mm512_permutex2var_ps(low, even, high), _mm512_set1_ps(s0));
    const __m512 hi = _mm512_mul_ps(_mm512_permutex2var_ps(low, odd, high), _mm512_set1_ps(s1));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo in the low half
}

// The bf16 of each of a 6-bit element's 64 codes (values exact in bf16: E2M3, E3M2), for vpermi2w.
struct Fp6Bf16 {
    __m512i t0, t1;
};
CUMULO_ELEMENTS_BF16 inline Fp6Bf16 make_fp6_bf16(const float* values) {
    alignas(64) uint16_t h[64];
    for (int c = 0; c < 64; ++c) {
        uint32_t u;
        memcpy(&u, &values[c], 4);
        h[c] = (uint16_t)(u >> 16);
    }
    return {_mm512_load_si512(h), _mm512_load_si512(h + 32)};
}

// 24 bytes of 6-bit codes (code j of each 24-bit little-endian word at bits 6j) -> 32 bf16 in element order:
// vpermb spreads each 3-byte word into a dword, vpmultishiftqb picks the four 6-bit fields of each dword, and
// vpermi2w looks the codes up in the 64-entry table.
CUMULO_ELEMENTS_BF16 inline __m512i fp6x32_bf16(const uint8_t* p, const Fp6Bf16& t) {
    const __m256i bytes = _mm256_maskz_loadu_epi8((__mmask32)0xFFFFFF, p);
    const __m256i spread = _mm256_setr_epi8(0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12, 13, 14, 14, 15, 16,
                                            17, 17, 18, 19, 20, 20, 21, 22, 23, 23);
    const __m256i words = _mm256_permutexvar_epi8(spread, bytes);
    const __m256i fields = _mm256_set1_epi64x(0x322C2620120C0600LL);  // bit offsets 0, 6, 12, 18, 32, ..., 50
    const __m256i codes = _mm256_and_si256(_mm256_multishift_epi64_epi8(fields, words), _mm256_set1_epi8(0x3F));
    return _mm512_permutex2var_epi16(t.t0, _mm512_cvtepu8_epi16(codes), t.t1);
}

}  // namespace cumulo_elements

// Table kernels for x86-64 CPUs with AVX2, FMA and F16C (cumulo.formats.kernels.cpu): y = x W^T for few rows of
// x and any 8-, 6- or 4-bit element type without a hand-written decoder (HiF8, NVFP4, MXFP6), decoded through a
// table of its 256 (64, 16) values, and MX INT8, decoded arithmetically.
//
// 8-bit codes use an AVX2 gather; 4-bit codes two 8-entry vpermps lookups and a blend on the code's top bit;
// 6-bit codes are unpacked from 24-bit words. MX INT8 (bits = 0) needs no table: its value is the two's
// complement integer times 2^-6, and the 2^-6 goes into the scale (AVX-512: int8_row_512). Scales come as fp32
// per block, or as byte codes decoded through their own table times a global factor (E8M0 for MX, E4M3 times
// the tensor scale for NVFP4). bk is a multiple of 16, or K itself. HiF8 and MX INT8 with bf16 x take the FP8
// bf16 kernel where it runs (fp8.cpp: cumulo_table8_linear_bf16). The entry point as kernel.h declares it,
// OpenMP over output rows.

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "cpu_features.h"
#include "kernel.h"
#include "simd.h"

namespace {

using cumulo_simd::Bf16Io;
using cumulo_simd::hsum;

constexpr int MB = 4;  // rows of x handled per pass over a weight row
constexpr int kAhead = 16384;  // bytes of codes prefetched ahead of the loads (into L2)

struct LutScales {
    const float* f32;
    const uint8_t* codes;
    const float* table;
    float mul;
    int64_t cols;
    inline float at(int64_t rb, int64_t kb) const {
        return f32 ? f32[rb * cols + kb] : table[codes[rb * cols + kb]] * mul;
    }
};

// Code k of a packed row: bytes (8-bit, MX INT8), nibbles (4-bit, element 0 low), or 6-bit fields of 24-bit
// little-endian words (four codes per three bytes; see cumulo.formats.packing).
template <int BITS>
inline uint8_t code_at(const uint8_t* row, int64_t k) {
    if (BITS == 4) return k & 1 ? row[k / 2] >> 4 : row[k / 2] & 0xF;
    if (BITS == 6) {
        const uint8_t* q = row + k / 4 * 3;
        const uint32_t w = q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16;
        return (uint8_t)((w >> (6 * (k % 4))) & 63);
    }
    return row[k];
}

template <int BITS>
inline void decode_lut_16(const uint8_t* row, int64_t k, const float* lut, __m256 lut_lo, __m256 lut_hi,
                          __m256& w0, __m256& w1) {
    if (BITS == 0) {
        const __m128i b = _mm_loadu_si128((const __m128i*)(row + k));
        w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    } else if (BITS == 6) {  // four codes per 24-bit little-endian word; k is a multiple of 16 here
        alignas(32) float v[16];
        const uint8_t* q = row + k / 4 * 3;
        for (int g = 0; g < 4; ++g) {
            const uint32_t w = q[3 * g] | (uint32_t)q[3 * g + 1] << 8 | (uint32_t)q[3 * g + 2] << 16;
            for (int j = 0; j < 4; ++j) v[4 * g + j] = lut[(w >> (6 * j)) & 63];
        }
        w0 = _mm256_load_ps(v);
        w1 = _mm256_load_ps(v + 8);
    } else if (BITS == 8) {
        const __m128i b = _mm_loadu_si128((const __m128i*)(row + k));
        w0 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(b), 4);
        w1 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), 4);
    } else {
        const __m128i b = _mm_loadl_epi64((const __m128i*)(row + k / 2));
        const __m128i low = _mm_set1_epi8(0x0F);
        const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
        const __m256i i0 = _mm256_cvtepu8_epi32(nib), i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8));
        w0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, i0), _mm256_permutevar8x32_ps(lut_hi, i0),
                              _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
        w1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, i1), _mm256_permutevar8x32_ps(lut_hi, i1),
                              _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
    }
}

template <int BITS, int R>
void lut_row(const float* x, int64_t K, const uint8_t* row, const float* lut, const LutScales& sc, int64_t rb,
             int64_t bk, float* out) {
    const __m256 lut_lo = _mm256_loadu_ps(lut), lut_hi = _mm256_loadu_ps(lut + 8);
    __m256 acc[R][2];
    float tail[R];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps(), tail[i] = 0.0f;
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        const float s = sc.at(rb, kb);
        const __m256 sv = _mm256_set1_ps(BITS == 0 ? s * 0x1p-6f : s);
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
            __m256 w0, w1;
            decode_lut_16<BITS>(row, k, lut, lut_lo, lut_hi, w0, w1);
            w0 = _mm256_mul_ps(w0, sv);
            w1 = _mm256_mul_ps(w1, sv);
            for (int i = 0; i < R; ++i) {
                acc[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * K + k), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * K + k + 8), acc[i][1]);
            }
        }
        for (; k < k1; ++k) {
            const uint8_t c = code_at<BITS>(row, k);
            const float w = lut[c] * s;
            for (int i = 0; i < R; ++i) tail[i] += w * x[i * K + k];
        }
    }
    for (int i = 0; i < R; ++i) out[i] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) + tail[i];
}

template <int BITS>
void lut_linear(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const float* lut,
                const LutScales& sc, int64_t bn, int64_t bk, float* y, int nthreads) {
    const int64_t row_bytes = BITS == 4 ? (K + 1) / 2 : BITS == 6 ? 3 * ((K + 3) / 4) : K;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB];
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float* xm = x + m0 * K;
            const uint8_t* row = codes + n * row_bytes;
            switch (mb) {
                case 1: lut_row<BITS, 1>(xm, K, row, lut, sc, n / bn, bk, out); break;
                case 2: lut_row<BITS, 2>(xm, K, row, lut, sc, n / bn, bk, out); break;
                case 3: lut_row<BITS, 3>(xm, K, row, lut, sc, n / bn, bk, out); break;
                default: lut_row<BITS, 4>(xm, K, row, lut, sc, n / bn, bk, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
        }
    }
}

// MX INT8 on AVX-512: 16 codes widened to fp32 per step (value = code x 2^-6, folded into the block scale),
// products summed per block and the block's scale applied once; masked loads for tails.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void int8_row_512(const float* x, int64_t K,
                                                                        const uint8_t* row, const LutScales& sc,
                                                                        int64_t rb, int64_t bk, float* out) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        __m512 blk[R];
        for (int i = 0; i < R; ++i) blk[i] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 16) {
            _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
            const __mmask16 m = k1 - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k1 - k)) - 1u);
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, row + k)));
            for (int i = 0; i < R; ++i)
                blk[i] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + i * K + k), blk[i]);
        }
        const __m512 s = _mm512_set1_ps(sc.at(rb, kb) * 0x1p-6f);
        for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(blk[i], s, acc[i]);
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

void int8_linear_512(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const LutScales& sc,
                     int64_t bn, int64_t bk, float* y, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB];
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float* xm = x + m0 * K;
            const uint8_t* row = codes + n * K;
            switch (mb) {
                case 1: int8_row_512<1>(xm, K, row, sc, n / bn, bk, out); break;
                case 2: int8_row_512<2>(xm, K, row, sc, n / bn, bk, out); break;
                case 3: int8_row_512<3>(xm, K, row, sc, n / bn, bk, out); break;
                default: int8_row_512<4>(xm, K, row, sc, n / bn, bk, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
        }
    }
}

}  // namespace

// x [M, K]; codes [N, K] bytes (bits = 8; bits = 0: MX INT8), [N, ceil(K / 2)] packed nibbles, element 0 low
// (bits = 4), or 6-bit codes in 24-bit words (bits = 6); lut: 256 floats (value of each code); scales: fp32
// [ceil(N / bn), ceil(K / bk)], or byte codes of that shape with scale_lut (256 floats) and scale_mul; y [M, N].
// x and y fp32, or bf16 with bf16 = 1 (see Bf16Io); wide_ok = 0 keeps MX INT8 on its AVX2 path (tests).
#define CUMULO_LUT_LINEAR(X)                                                                                    \
    X(const void*, x) X(int64_t, M) X(int64_t, K) X(const uint8_t*, codes) X(int64_t, N) X(int, bits)             \
        X(const float*, lut) X(const float*, scales_f32) X(const uint8_t*, scale_codes) X(const float*, scale_lut) \
            X(float, scale_mul) X(int64_t, bn) X(int64_t, bk) X(void*, y) X(int, threads) X(int, bf16)            \
                X(int, wide_ok)
CUMULO_KERNEL(cumulo_lut_linear, CUMULO_LUT_LINEAR) {
    const int64_t M = a.M, K = a.K, N = a.N, bn = a.bn, bk = a.bk;
    const LutScales sc{a.scales_f32, a.scale_codes, a.scale_lut, a.scale_mul, (K + bk - 1) / bk};
    Bf16Io io;
    const float* xf = io.x(a.x, M * K, a.bf16);
    float* yf = io.y(a.y, M * N, a.bf16);
    const uint8_t* codes = a.codes;
    const float* lut = a.lut;
    const int nt = a.threads;
    if (a.bits == 0 && a.wide_ok && cumulo_cpu::avx512()) int8_linear_512(xf, M, K, codes, N, sc, bn, bk, yf, nt);
    else if (a.bits == 0) lut_linear<0>(xf, M, K, codes, N, lut, sc, bn, bk, yf, nt);
    else if (a.bits == 8) lut_linear<8>(xf, M, K, codes, N, lut, sc, bn, bk, yf, nt);
    else if (a.bits == 6) lut_linear<6>(xf, M, K, codes, N, lut, sc, bn, bk, yf, nt);
    else lut_linear<4>(xf, M, K, codes, N, lut, sc, bn, bk, yf, nt);
    io.finish(a.y, M * N, a.bf16);
    return 0;
}

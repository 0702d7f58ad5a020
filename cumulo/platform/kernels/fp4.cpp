// MXFP4 kernels for x86-64 CPUs with AVX2, FMA and F16C (cumulo.formats.kernels.cpu): packed E2M1 codes [N, K / 2]
// (element 0 in the low nibble) with one E8M0 scale per 32 codes [N, K / 32], K % 32 == 0. The fused product
// y = x W^T for few rows of x, and dequantization of W for prefill. Also NVFP4 with bf16 x (the same codes, an
// E4M3 scale per 16, an fp32 tensor scale): cumulo_nvfp4_linear_bf16 at the end, through decoded.h.
//
// Each weight byte (two codes) is read once and decoded in registers (elements.h): on AVX2 through a 16-entry
// byte table of 2 x value with pshufb, the 1/2 folded into the E8M0 block scale; with bf16 x on AVX512-BF16
// through tables of the exact bf16 of each code, multiplied with vdpbf16ps. Entry points as kernel.h declares
// them, OpenMP over output rows.

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "cpu_features.h"
#include "decoded.h"
#include "elements.h"
#include "kernel.h"
#include "simd.h"
#include "tile.h"

namespace {

using namespace cumulo_elements;
using cumulo_bf16::from_float;
using cumulo_simd::Bf16Io;
using cumulo_simd::hsum;
using cumulo_simd::Scratch;

constexpr int MB = 4;  // rows of x handled per pass over a weight row
constexpr int MB_BF16 = 8;  // the same for the bf16 kernel, whose nibble decode costs more than the products:
                            // decoded once per 8 rows, not 4 (faster at 12-16 sequences: docs/benchmarks.md)
constexpr int NR = 4;  // weight rows per pass in the single-row (M = 1) bf16 decode kernel
// From this many rows of bf16 x, the codes are decoded into bf16 once per call, a few weight rows at a time, for
// the dense tile (cumulo_tile::decode_tiles); below it mxfp4_row_bf16 decodes in registers as it multiplies.
constexpr int64_t kDecodeOnceRows = 8;
constexpr int kAhead = 16384;  // bytes of codes prefetched ahead of the loads (into L2)

// One weight row against R rows of x; four accumulators per row, one per 8 codes.
template <int R>
void mxfp4_row(const float* x, int64_t K, const uint8_t* row, const uint8_t* scales, float* out) {
    __m256 acc[R][4];
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 32; ++b) {
        __m256 w[4];
        e2m1x32_f32(row + b * 16, w);
        const __m256 sv = _mm256_set1_ps(e8m0_value(scales[b]) * 0.5f);
        for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(w[j], sv);
        for (int i = 0; i < R; ++i) {
            const float* xr = x + i * K + b * 32;
            for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr + 8 * j), acc[i][j]);
        }
    }
    for (int i = 0; i < R; ++i)
        out[i] = hsum(_mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3])));
}

// x [M, K] fp32 -> y [M, N] fp32.
void mxfp4_linear_f32(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const uint8_t* scales,
                      float* y, int nthreads) {
    const int64_t nb = K / 32;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* row = codes + n * (K / 2);
        const uint8_t* sc = scales + n * nb;
        float out[MB];
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float* xm = x + m0 * K;
            switch (mb) {
                case 1: mxfp4_row<1>(xm, K, row, sc, out); break;
                case 2: mxfp4_row<2>(xm, K, row, sc, out); break;
                case 3: mxfp4_row<3>(xm, K, row, sc, out); break;
                default: mxfp4_row<4>(xm, K, row, sc, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
        }
    }
}

// With bf16 x: E2M1 values are exact bf16, looked up per nibble with vpshufb (kE2M1Bf16: the bf16's low bytes
// and its high bytes, sign in the nibble's top bit). 64 code bytes hold 128 elements, the even ones in low
// nibbles; each 128-bit lane holds exactly one 32-element MX block, so the E8M0 scales go on per lane. x is
// permuted once per call into the order the unpacks produce: per 64-byte chunk, even elements of each lane's
// first and second 8 bytes, then the odd ones.
void permute_x_fp4(const uint16_t* x, int64_t K, uint16_t* out) {
    for (int64_t c = 0; c < K / 128 + (K % 128 != 0); ++c)
        for (int part = 0; part < 4; ++part)  // even/first, even/second, odd/first, odd/second half-lanes
            for (int l = 0; l < 4; ++l)
                for (int i = 0; i < 8; ++i) {
                    const int64_t byte = c * 64 + 16 * l + (part & 1) * 8 + i;
                    const int64_t e = 2 * byte + (part >> 1);
                    out[c * 128 + part * 32 + 8 * l + i] = e < K ? x[e] : 0;
                }
}

#define CUMULO_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define CUMULO_DEQUANT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

template <int R>
CUMULO_BF16 void mxfp4_row_bf16(const uint16_t* xp, int64_t xs, int64_t K, const uint8_t* row,
                                const uint8_t* scales, float* out) {
    const __m512i TL = _mm512_load_si512(kE2M1Bf16.lo), TH = _mm512_load_si512(kE2M1Bf16.hi);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t bytes = K / 2;
    for (int64_t b = 0; b < bytes; b += 64) {
        _mm_prefetch((const char*)(row + b) + kAhead, _MM_HINT_T1);
        const int64_t left = bytes - b;
        const __mmask64 m = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        const __m512i c = _mm512_maskz_loadu_epi8(m, row + b);
        const __m512i ne = _mm512_and_si512(c, low), no = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
        const __m512i le = _mm512_shuffle_epi8(TL, ne), he = _mm512_shuffle_epi8(TH, ne);
        const __m512i lo = _mm512_shuffle_epi8(TL, no), ho = _mm512_shuffle_epi8(TH, no);
        const __m512i w[4] = {_mm512_unpacklo_epi8(le, he), _mm512_unpackhi_epi8(le, he),
                              _mm512_unpacklo_epi8(lo, ho), _mm512_unpackhi_epi8(lo, ho)};
        // four E8M0 scales (blocks b/16 .. b/16 + 3) -> fp32 by placing the code in the exponent field
        uint32_t four = 0;  // the chunk's four scale bytes (fewer in a tail chunk; missing ones stay 0)
        memcpy(&four, scales + b / 16, left >= 64 ? 4 : (size_t)((left + 15) / 16));
        const __m128i e = _mm_slli_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)four)), 23);
        const __m512 s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_castsi128_ps(e)));
        for (int i = 0; i < R; ++i) {
            const uint16_t* xr = xp + i * xs + 2 * b;
            __m512 p = _mm512_setzero_ps();
            for (int q = 0; q < 4; ++q)
                p = _mm512_dpbf16_ps(p, (__m512bh)w[q], (__m512bh)_mm512_loadu_si512(xr + 32 * q));
            acc[i] = _mm512_fmadd_ps(p, s, acc[i]);
        }
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// Single-row decode (M = 1): NR weight rows per pass, sharing each chunk's x loads. One row of a SmolLM2-sized
// matrix is only 288 code bytes, so a one-row loop spends as long on set-up, the dependent dot-product chain
// and the final reduction as on the codes; NR independent rows keep the execution ports busy instead
// (see docs/formats.md for the GB/s per thread).
template <int NR>
CUMULO_BF16 void mxfp4_rows_bf16(const uint16_t* xp, int64_t K, const uint8_t* rows, const uint8_t* scales,
                                 float* out) {
    const __m512i TL = _mm512_load_si512(kE2M1Bf16.lo), TH = _mm512_load_si512(kE2M1Bf16.hi);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int64_t bytes = K / 2, nb = K / 32;
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < bytes; b += 64) {
        const int64_t left = bytes - b;
        const __mmask64 m = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        const uint16_t* xr = xp + 2 * b;
        const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 32);
        const __m512i x2 = _mm512_loadu_si512(xr + 64), x3 = _mm512_loadu_si512(xr + 96);
        for (int r = 0; r < NR; ++r) {
            const uint8_t* row = rows + r * bytes;
            _mm_prefetch((const char*)(row + b) + kAhead, _MM_HINT_T1);
            const __m512i c = _mm512_maskz_loadu_epi8(m, row + b);
            const __m512i ne = _mm512_and_si512(c, low), no = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
            const __m512i le = _mm512_shuffle_epi8(TL, ne), he = _mm512_shuffle_epi8(TH, ne);
            const __m512i lo = _mm512_shuffle_epi8(TL, no), ho = _mm512_shuffle_epi8(TH, no);
            uint32_t four = 0;  // this chunk's four scale bytes (fewer in a tail chunk; missing ones stay 0)
            const uint8_t* sp = scales + r * nb + b / 16;
            if (left >= 64) memcpy(&four, sp, 4);
            else memcpy(&four, sp, (size_t)((left + 15) / 16));
            const __m128i e = _mm_slli_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)four)), 23);
            const __m512 s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_castsi128_ps(e)));
            __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_unpacklo_epi8(le, he), (__m512bh)x0);
            __m512 p1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_unpackhi_epi8(le, he), (__m512bh)x1);
            p0 = _mm512_dpbf16_ps(p0, (__m512bh)_mm512_unpacklo_epi8(lo, ho), (__m512bh)x2);
            p1 = _mm512_dpbf16_ps(p1, (__m512bh)_mm512_unpackhi_epi8(lo, ho), (__m512bh)x3);
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), s, acc[r]);
        }
    }
    for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Dequantizing into bf16 (see fp8.cpp): a block of 32 is 16 bytes, whose nibbles are looked up in a 16-entry
// fp32 table, put back in element order, times the block's E8M0 scale and rounded by cumulo_bf16::store16. One
// weight row (codes [K / 2], scales [K / 32]) into out [K]:
CUMULO_DEQUANT_BF16 void mxfp4_dequant_row_bf16(const uint8_t* codes, int64_t K, const uint8_t* scales,
                                                uint16_t* out) {
    const __m512 table = _mm512_loadu_ps(kE2M1);
    const __m512i even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t b = 0; b < K / 32; ++b) {
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes + b * 16)));
        const __m512 s = _mm512_set1_ps(e8m0_value(scales[b]));
        const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)), table);
        const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
        const __m512 lo = _mm512_mul_ps(_mm512_permutex2var_ps(low, even, high), s);  // elements 0..15
        const __m512 hi = _mm512_mul_ps(_mm512_permutex2var_ps(low, odd, high), s);  // elements 16..31
        cumulo_bf16::store16(out + b * 32, lo, (__mmask16)0xFFFF);
        cumulo_bf16::store16(out + b * 32 + 16, hi, (__mmask16)0xFFFF);
    }
}

void mxfp4_dequant_bf16(const uint8_t* codes, int64_t N, int64_t K, const uint8_t* scales, uint16_t* out,
                        int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) mxfp4_dequant_row_bf16(codes + n * (K / 2), K, scales + n * (K / 32), out + n * K);
}

// Whether every E8M0 scale keeps value x scale a normal bf16 for every E2M1 magnitude (0.5 .. 6): codes 3 .. 250
// (255, NaN, is out of it). Then mxfp4_decode_row_bf16 scales exactly.
bool scales_in_range(const uint8_t* scales, int64_t n) {
    uint8_t lo = 255, hi = 0;
    for (int64_t i = 0; i < n; ++i) {
        lo = scales[i] < lo ? scales[i] : lo;
        hi = scales[i] > hi ? scales[i] : hi;
    }
    return lo >= 3 && hi <= 250;
}

// One row of codes [K / 2] -> bf16 in the lane order of mxfp4_row_bf16 (x permuted by permute_x_fp4), K rounded up
// to 128 (zeros past K): the exact bf16 of each code (kE2M1Bf16), times its block's E8M0 scale 2^(c - 127) by
// adding (c - 127) << 7 to the bf16 (exact for normal results: scales_in_range). Each 128-bit lane is one block.
CUMULO_BF16 void mxfp4_decode_row_bf16(const uint8_t* row, int64_t K, const uint8_t* scales, uint16_t* out) {
    const __m512i TL = _mm512_load_si512(kE2M1Bf16.lo), TH = _mm512_load_si512(kE2M1Bf16.hi);
    const __m512i low = _mm512_set1_epi8(0x0F), mag = _mm512_set1_epi16(0x7FFF);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int64_t bytes = K / 2;
    for (int64_t b = 0; b < bytes; b += 64) {
        const int64_t left = bytes - b;
        const __mmask64 m = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        const __m512i c = _mm512_maskz_loadu_epi8(m, row + b);
        const __m512i ne = _mm512_and_si512(c, low), no = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
        const __m512i le = _mm512_shuffle_epi8(TL, ne), he = _mm512_shuffle_epi8(TH, ne);
        const __m512i lo = _mm512_shuffle_epi8(TL, no), ho = _mm512_shuffle_epi8(TH, no);
        alignas(16) int32_t add[4];
        for (int l = 0; l < 4; ++l) {
            const int e = 16 * l < left ? (int)scales[b / 16 + l] - 127 : 0;
            add[l] = (int32_t)(((uint32_t)(e * 128) & 0xFFFF) * 0x10001u);
        }
        const __m512i shift = _mm512_permutexvar_epi32(spread, _mm512_castsi128_si512(_mm_load_si128((__m128i*)add)));
        const __m512i w[4] = {_mm512_unpacklo_epi8(le, he), _mm512_unpackhi_epi8(le, he),
                              _mm512_unpacklo_epi8(lo, ho), _mm512_unpackhi_epi8(lo, ho)};
        for (int q = 0; q < 4; ++q)
            _mm512_storeu_si512(out + 2 * b + 32 * q,
                                _mm512_mask_add_epi16(w[q], _mm512_test_epi16_mask(w[q], mag), w[q], shift));
    }
}

// bf16 x [M, K] -> bf16 y [M, N] through mxfp4_row_bf16 (mxfp4_rows_bf16 when M = 1); from kDecodeOnceRows rows
// through rows decoded into bf16 for the dense tile (cumulo_tile::decode_tiles) where the scales allow.
void mxfp4_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
                       const uint8_t* scales, uint16_t* y, int nthreads) {
    const int64_t xs = (K + 127) / 128 * 128;
    Scratch<uint16_t> xp(M * xs);
    for (int64_t m = 0; m < M; ++m) permute_x_fp4(x + m * K, K, xp.data() + m * xs);
    if (M >= kDecodeOnceRows && scales_in_range(scales, N * (K / 32))) {
        const auto decode = [&](int64_t n0, int64_t nr, uint16_t* w) {
            for (int64_t r = 0; r < nr; ++r)
                mxfp4_decode_row_bf16(codes + (n0 + r) * (K / 2), K, scales + (n0 + r) * (K / 32), w + r * xs);
        };
        cumulo_tile::decode_tiles(xp.data(), M, xs, N, decode, y, nthreads);
        return;
    }
    if (M == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t g = 0; g < (N + NR - 1) / NR; ++g) {
            const int64_t n0 = g * NR, nr = N - n0 < NR ? N - n0 : NR;
            float out[NR];
            if (nr == NR) mxfp4_rows_bf16<NR>(xp.data(), K, codes + n0 * (K / 2), scales + n0 * (K / 32), out);
            else
                for (int64_t r = 0; r < nr; ++r)
                    mxfp4_rows_bf16<1>(xp.data(), K, codes + (n0 + r) * (K / 2), scales + (n0 + r) * (K / 32),
                                       out + r);
            for (int64_t r = 0; r < nr; ++r) y[n0 + r] = from_float(out[r]);
        }
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB_BF16];
        const uint8_t* row = codes + n * (K / 2);
        const uint8_t* sc = scales + n * (K / 32);
        for (int64_t m0 = 0; m0 < M; m0 += MB_BF16) {
            const int64_t mb = M - m0 < MB_BF16 ? M - m0 : MB_BF16;
            const uint16_t* xm = xp.data() + m0 * xs;
            switch (mb) {
                case 1: mxfp4_row_bf16<1>(xm, xs, K, row, sc, out); break;
                case 2: mxfp4_row_bf16<2>(xm, xs, K, row, sc, out); break;
                case 3: mxfp4_row_bf16<3>(xm, xs, K, row, sc, out); break;
                case 4: mxfp4_row_bf16<4>(xm, xs, K, row, sc, out); break;
                case 5: mxfp4_row_bf16<5>(xm, xs, K, row, sc, out); break;
                case 6: mxfp4_row_bf16<6>(xm, xs, K, row, sc, out); break;
                case 7: mxfp4_row_bf16<7>(xm, xs, K, row, sc, out); break;
                default: mxfp4_row_bf16<8>(xm, xs, K, row, sc, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = from_float(out[i]);
        }
    }
}

}  // namespace

// y = x W^T. x [M, K] and y [M, N]: fp32, or bf16 when bf16 = 1. wide_ok = 0 keeps the AVX2 path (tests).
#define CUMULO_MXFP4_LINEAR(X)                                                                             \
    X(const void*, x) X(int64_t, M) X(int64_t, K) X(const uint8_t*, codes) X(int64_t, N) X(const uint8_t*, scales) \
        X(void*, y) X(int, threads) X(int, bf16) X(int, wide_ok)
CUMULO_KERNEL(cumulo_mxfp4_linear, CUMULO_MXFP4_LINEAR) {
    if (a.bf16 && a.wide_ok && cumulo_cpu::avx512_bf16_vbmi()) {
        mxfp4_linear_bf16((const uint16_t*)a.x, a.M, a.K, a.codes, a.N, a.scales, (uint16_t*)a.y, a.threads);
        return 0;
    }
    Bf16Io io;
    const float* xf = io.x(a.x, a.M * a.K, a.bf16);
    float* yf = io.y(a.y, a.M * a.N, a.bf16);
    mxfp4_linear_f32(xf, a.M, a.K, a.codes, a.N, a.scales, yf, a.threads);
    io.finish(a.y, a.M * a.N, a.bf16);
    return 0;
}

// Dequantize into out [N, K]: fp32 (the prefill path: then one sgemm), or bf16 with bf16 = 1 where the CPU has
// AVX512-BF16 (else returns 1, nothing written).
#define CUMULO_MXFP4_DEQUANT(X)                                                                         \
    X(const uint8_t*, codes) X(int64_t, N) X(int64_t, K) X(const uint8_t*, scales) X(void*, out) X(int, threads) \
        X(int, bf16)
CUMULO_KERNEL(cumulo_mxfp4_dequant, CUMULO_MXFP4_DEQUANT) {
    const int64_t N = a.N, K = a.K;
    if (a.bf16) {
        if (!cumulo_cpu::avx512_bf16() || K % 32) return 1;
        mxfp4_dequant_bf16(a.codes, N, K, a.scales, (uint16_t*)a.out, a.threads);
        return 0;
    }
    const uint8_t *codes = a.codes, *scales = a.scales;
    float* out = (float*)a.out;
#pragma omp parallel for num_threads(a.threads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
            const uint8_t byte = codes[n * (K / 2) + k / 2];
            out[n * K + k] = kE2M1[k & 1 ? byte >> 4 : byte & 0xF] * e8m0_value(scales[n * (K / 32) + k / 32]);
        }
    return 0;
}

namespace {

// NVFP4 row n's elements 32g .. 32g + 31 as exact bf16 (elements.h: nvfp4x32_bf16); E4M3 scale codes through
// their 256 values.
struct Nvfp4Dec {
    const uint8_t* codes;
    const uint8_t* scales;
    const float* scale_values;
    int64_t K;
    CUMULO_DECODED inline __m512i operator()(int64_t n, int64_t g) const {
        const uint8_t* s = scales + n * (K / 16) + 2 * g;
        return nvfp4x32_bf16(codes + n * (K / 2) + 16 * g, scale_values[s[0]], scale_values[s[1]]);
    }
};

}  // namespace

// NVFP4 with bf16 x [M, K] -> bf16 y [M, N]: codes [N, K / 2] (element 0 low), E4M3 scale codes [N, K / 16]
// decoded through scale_lut (256 floats), tensor_scale applied to the fp32 sums. Returns 1 (nothing written)
// without AVX512-BF16 + VBMI or when K % 32 != 0.
#define CUMULO_NVFP4_LINEAR_BF16(X)                                                                        \
    X(const void*, x) X(int64_t, M) X(int64_t, K) X(const uint8_t*, codes) X(int64_t, N) X(const uint8_t*, scales) \
        X(const float*, scale_lut) X(float, tensor_scale) X(void*, y) X(int, threads)
CUMULO_KERNEL(cumulo_nvfp4_linear_bf16, CUMULO_NVFP4_LINEAR_BF16) {
    if (!cumulo_cpu::avx512_bf16_vbmi() || a.K % 32) return 1;
    const Nvfp4Dec dec{a.codes, a.scales, a.scale_lut, a.K};
    cumulo_decoded::linear((const uint16_t*)a.x, a.M, a.K, a.N, dec, a.tensor_scale, (uint16_t*)a.y, a.threads);
    return 0;
}

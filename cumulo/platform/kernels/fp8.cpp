// FP8 (E4M3) kernels for x86-64 CPUs with AVX2, FMA and F16C (cumulo.formats.kernels.cpu): the fused product
// y = x W^T for few rows of x, and dequantization of W for prefill.
//
// y[m, n] = sum_k x[m, k] * value(code[n, k]) * scale(n, k). Each weight byte is read once and decoded in
// registers (elements.h), so a decode step streams 1 byte per weight. Three paths, chosen at run time:
// - AVX2: codes -> fp32 times 2^-120, the block scale (times 2^120) applied per weight before the FMAs;
// - AVX-512: codes -> fp32 times 2^-8 through fp16, products summed per scale block, the block's scale applied
//   once per block;
// - bf16 x on AVX512-BF16 + VBMI: codes looked up as exact bf16 and multiplied with vdpbf16ps, 32 products per
//   instruction (also HiF8 and MX INT8, through their own byte tables: cumulo_table8_linear_bf16).
// Block scales are fp32 or E8M0 bytes [ceil(N / bn), ceil(K / bk)]; bk is a multiple of 16, or K itself.
// Entry points as kernel.h declares them (called through ctypes), OpenMP over output rows.

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "cpu_features.h"
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
constexpr int NR = 4;  // weight rows per pass in the single-row (M = 1) bf16 decode kernels
constexpr int kAhead = 16384;  // bytes of codes prefetched ahead of the loads (into L2)
// From this many rows of bf16 x, E4M3 weights are decoded into bf16 once per call, a few rows at a time, for the
// dense tile (cumulo_tile::decode_tiles); below it the row kernels decode in registers as they multiply.
constexpr int64_t kDecodeOnceRows = 8;

// scale of block (row block rb, column block kb): fp32 table or E8M0 byte table.
struct Scales {
    const float* f32;
    const uint8_t* e8m0;
    int64_t cols;
    inline float at(int64_t rb, int64_t kb) const {
        return f32 ? f32[rb * cols + kb] : e8m0_value(e8m0[rb * cols + kb]);
    }
};

// One weight row against R rows of x (R is a template argument so the accumulators stay in registers).
// Weights are multiplied by their block scale as they are decoded, and each row keeps 2C independent
// accumulators (C groups of 16 codes per step, C <= 4 / R and dividing the block) so FMA latency never
// serialises the loop.
template <int R, int C>
void fp8_row(const float* x, int64_t K, const uint8_t* row, const Scales& sc, int64_t rb, int64_t bk,
             float* out) {
    __m256 acc[R][2 * C];
    float tail[R];
    for (int i = 0; i < R; ++i) {
        tail[i] = 0.0f;
        for (int c = 0; c < 2 * C; ++c) acc[i][c] = _mm256_setzero_ps();
    }
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        const float s = sc.at(rb, kb);
        const E4M3Scale sv(s);
        int64_t k = k0;
        for (; k + 16 * C <= k1; k += 16 * C) {
            for (int c = 0; c < C; ++c) {
                const __m256 w0 = sv.apply(e4m3x8_f32(row + k + 16 * c));
                const __m256 w1 = sv.apply(e4m3x8_f32(row + k + 16 * c + 8));
                for (int i = 0; i < R; ++i) {
                    const float* xr = x + i * K + k + 16 * c;
                    acc[i][2 * c] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[i][2 * c]);
                    acc[i][2 * c + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[i][2 * c + 1]);
                }
            }
        }
        for (; k + 16 <= k1; k += 16) {
            const __m256 w0 = sv.apply(e4m3x8_f32(row + k));
            const __m256 w1 = sv.apply(e4m3x8_f32(row + k + 8));
            for (int i = 0; i < R; ++i) {
                acc[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * K + k), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * K + k + 8), acc[i][1]);
            }
        }
        for (; k < k1; ++k) {
            const float w = e4m3_value(row[k]) * s;
            for (int i = 0; i < R; ++i) tail[i] += w * x[i * K + k];
        }
    }
    for (int i = 0; i < R; ++i) {
        __m256 sum = acc[i][0];
        for (int c = 1; c < 2 * C; ++c) sum = _mm256_add_ps(sum, acc[i][c]);
        out[i] = hsum(sum) + tail[i];
    }
}

// AVX-512 version of fp8_row: 16 codes per step (e4m3x16_fp16). Products are summed per scale block and the
// block's scale (times 2^8) is applied once per block, not per weight. Rows a thread reads are contiguous, so
// the next rows are prefetched across row ends; code tails shorter than 16 use masked loads (zeros add nothing).
template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void fp8_row_512(const float* x, int64_t K,
                                                                       const uint8_t* row, const Scales& sc,
                                                                       int64_t rb, int64_t bk, float* out) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        __m512 blk[R][C];
        for (int i = 0; i < R; ++i)
            for (int c = 0; c < C; ++c) blk[i][c] = _mm512_setzero_ps();
        int64_t k = k0;
        for (; k + 16 * C <= k1; k += 16 * C) {
            _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
            for (int c = 0; c < C; ++c) {
                const __m512 w = e4m3x16_fp16(row + k + 16 * c, 0xFFFF);
                for (int i = 0; i < R; ++i)
                    blk[i][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * K + k + 16 * c), blk[i][c]);
            }
        }
        for (; k < k1; k += 16) {
            const __mmask16 m = k1 - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k1 - k)) - 1u);
            const __m512 w = e4m3x16_fp16(row + k, m);
            for (int i = 0; i < R; ++i)
                blk[i][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + i * K + k), blk[i][0]);
        }
        const __m512 s = _mm512_set1_ps(sc.at(rb, kb) * 256.0f);
        for (int i = 0; i < R; ++i) {
            __m512 sum = blk[i][0];
            for (int c = 1; c < C; ++c) sum = _mm512_add_ps(sum, blk[i][c]);
            acc[i] = _mm512_fmadd_ps(sum, s, acc[i]);
        }
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// The FP8 row kernels of both instruction sets behind one driver: rows of W split across threads, x taken MB
// rows at a time, the accumulator count C chosen by how the scale block divides into steps.
struct Fp8Avx512 {
    template <int R, int C>
    static void row(const float* x, int64_t K, const uint8_t* w, const Scales& sc, int64_t rb, int64_t bk,
                    float* out) {
        fp8_row_512<R, C>(x, K, w, sc, rb, bk, out);
    }
};
struct Fp8Avx2 {
    template <int R, int C>
    static void row(const float* x, int64_t K, const uint8_t* w, const Scales& sc, int64_t rb, int64_t bk,
                    float* out) {
        fp8_row<R, C>(x, K, w, sc, rb, bk, out);
    }
};

template <class Path>
void fp8_rows(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const Scales& sc,
              int64_t bn, int64_t bk, float* y, int nthreads) {
    const bool by64 = bk % 64 == 0, by32 = bk % 32 == 0;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB];
        const uint8_t* row = codes + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float* xm = x + m0 * K;
            switch (mb) {
                case 1:
                    if (by64) Path::template row<1, 4>(xm, K, row, sc, n / bn, bk, out);
                    else if (by32) Path::template row<1, 2>(xm, K, row, sc, n / bn, bk, out);
                    else Path::template row<1, 1>(xm, K, row, sc, n / bn, bk, out);
                    break;
                case 2:
                    if (by32) Path::template row<2, 2>(xm, K, row, sc, n / bn, bk, out);
                    else Path::template row<2, 1>(xm, K, row, sc, n / bn, bk, out);
                    break;
                case 3: Path::template row<3, 1>(xm, K, row, sc, n / bn, bk, out); break;
                default: Path::template row<4, 1>(xm, K, row, sc, n / bn, bk, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
        }
    }
}

// x (bf16 bits, K of them) -> the lane order table8_bf16_64 produces, zero-padded to whole 64-code chunks.
void permute_x(const uint16_t* x, int64_t K, uint16_t* out) {
    const int64_t chunks = (K + 63) / 64;
    for (int64_t c = 0; c < chunks; ++c)
        for (int l = 0; l < 4; ++l)
            for (int j = 0; j < 8; ++j) {
                const int64_t a = c * 64 + 16 * l + j, b = a + 8;
                out[c * 64 + 8 * l + j] = a < K ? x[a] : 0;
                out[c * 64 + 32 + 8 * l + j] = b < K ? x[b] : 0;
            }
}

#define CUMULO_BF16_VBMI __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512bf16")))
#define CUMULO_DEQUANT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// 64 codes at p (the first `left` of them where fewer remain) -> 2 x 32 bf16.
CUMULO_BF16_VBMI inline void table8_64(const uint8_t* p, int64_t left, const Table8Bf16& t, __m512i& w0,
                                       __m512i& w1) {
    const __m512i s = left >= 64 ? _mm512_loadu_si512(p)
                                 : _mm512_maskz_loadu_epi8((((__mmask64)1 << left) - 1), p);
    table8_bf16_64(s, t, w0, w1);
}

// FP8 with bf16 activations: one weight row against R rows of permuted bf16 x (row stride xs). Block scales:
// per block when the block spans whole 64-code chunks (DeepSeek 128x128, per-channel), or per 128-bit lane (16
// codes) for MX's 32-code blocks.
template <int R>
CUMULO_BF16_VBMI void fp8_row_bf16(const uint16_t* xp, int64_t xs, int64_t K, const uint8_t* row,
                                   const Scales& sc, int64_t rb, int64_t bk, const Table8Bf16& t, float* out) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    if (bk % 64 == 0 || bk >= K) {
        for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
            const int64_t k1 = k0 + bk < K ? k0 + bk : K;
            __m512 b0[R], b1[R];
            for (int i = 0; i < R; ++i) b0[i] = b1[i] = _mm512_setzero_ps();
            for (int64_t k = k0; k < k1; k += 64) {
                _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
                __m512i w0, w1;
                table8_64(row + k, k1 - k, t, w0, w1);
                for (int i = 0; i < R; ++i) {
                    const uint16_t* xr = xp + i * xs + k;
                    b0[i] = _mm512_dpbf16_ps(b0[i], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xr));
                    b1[i] = _mm512_dpbf16_ps(b1[i], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xr + 32));
                }
            }
            const __m512 s = _mm512_set1_ps(sc.at(rb, kb));
            for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_add_ps(b0[i], b1[i]), s, acc[i]);
        }
    } else {  // bk is 16 or 32: a scale per 128-bit lane, fp32 lane j of a product belongs to code lane j / 4
        const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        for (int64_t k = 0; k < K; k += 64) {
            _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
            __m512i w0, w1;
            table8_64(row + k, K - k, t, w0, w1);
            __m512 s;
            if (bk == 32) {  // two blocks per chunk: fp32 lanes 0-7 and 8-15
                const int64_t kb = k / 32;
                s = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(sc.at(rb, kb)),
                                         _mm512_set1_ps(k + 32 < K ? sc.at(rb, kb + 1) : 0.0f));
            } else {
                alignas(16) float ls[4];
                for (int l = 0; l < 4; ++l) ls[l] = k + 16 * l < K ? sc.at(rb, (k + 16 * l) / bk) : 0.0f;
                s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_load_ps(ls)));
            }
            for (int i = 0; i < R; ++i) {
                const uint16_t* xr = xp + i * xs + k;
                __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xr));
                p = _mm512_dpbf16_ps(p, (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xr + 32));
                acc[i] = _mm512_fmadd_ps(p, s, acc[i]);
            }
        }
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// Single-row decode (M = 1) for blocks spanning whole 64-code chunks (DeepSeek 128 x 128, per channel, per
// tensor): NR weight rows per pass share each chunk's two x loads and keep NR independent chains in flight.
template <int NR>
CUMULO_BF16_VBMI void fp8_rows_bf16(const uint16_t* xp, int64_t K, const uint8_t* rows, const Scales& sc,
                                    int64_t n0, int64_t bn, int64_t bk, const Table8Bf16& t, float* out) {
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        __m512 b0[NR], b1[NR];
        for (int r = 0; r < NR; ++r) b0[r] = b1[r] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 64) {
            const __m512i x0 = _mm512_loadu_si512(xp + k), x1 = _mm512_loadu_si512(xp + k + 32);
            for (int r = 0; r < NR; ++r) {
                const uint8_t* row = rows + r * K;
                _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
                __m512i w0, w1;
                table8_64(row + k, k1 - k, t, w0, w1);
                b0[r] = _mm512_dpbf16_ps(b0[r], (__m512bh)w0, (__m512bh)x0);
                b1[r] = _mm512_dpbf16_ps(b1[r], (__m512bh)w1, (__m512bh)x1);
            }
        }
        for (int r = 0; r < NR; ++r)
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(b0[r], b1[r]), _mm512_set1_ps(sc.at((n0 + r) / bn, kb)), acc[r]);
    }
    for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// The same for MX's 32-code blocks (K % 32 == 0): two scales per 64-code chunk, on fp32 lanes 0-7 and 8-15.
template <int NR>
CUMULO_BF16_VBMI void fp8_rows_bf16_mx(const uint16_t* xp, int64_t K, const uint8_t* rows, const Scales& sc,
                                       int64_t n0, int64_t bn, const Table8Bf16& t, float* out) {
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        const __m512i x0 = _mm512_loadu_si512(xp + k), x1 = _mm512_loadu_si512(xp + k + 32);
        const bool full = K - k >= 64;
        const int64_t kb = k / 32;
        for (int r = 0; r < NR; ++r) {
            const uint8_t* row = rows + r * K;
            _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
            __m512i w0, w1;
            table8_64(row + k, K - k, t, w0, w1);
            const int64_t rb = (n0 + r) / bn;
            const __m512 s = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(sc.at(rb, kb)),
                                                  _mm512_set1_ps(full ? sc.at(rb, kb + 1) : 0.0f));
            __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w0, (__m512bh)x0);
            p = _mm512_dpbf16_ps(p, (__m512bh)w1, (__m512bh)x1);
            acc[r] = _mm512_fmadd_ps(p, s, acc[r]);
        }
    }
    for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Dequantizing into bf16, for prefill through torch's bf16 GEMM (several times its fp32 GEMM on CPUs with
// AVX512-BF16), and a few rows at a time for batches (fp8_linear_bf16 past kDecodeOnceRows). 16 values per step,
// as fp32, times their block scale (one rounding), then rounded to bf16 (cumulo_bf16::store16, torch's rounding).
// So the weights are bit-equal to the reference's bf16 dequantization, and exact wherever the scale is a power
// of two (E8M0), as E4M3 values are exact in bf16. One weight row (row block rb) into out [K]:
CUMULO_DEQUANT_BF16 void fp8_dequant_row_bf16(const uint8_t* row, int64_t K, const Scales& sc, int64_t rb,
                                              int64_t bk, uint16_t* out) {
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {  // bk is K or a multiple of 16
        // 2^120 goes into the scale, one multiply, unless that overflows a finite scale (256 or more): then
        // onto the values first. Either way the product is the value times the scale, rounded once.
        const float s = sc.at(rb, kb), folded = s * 0x1p120f;
        const bool fold = __builtin_isfinite(folded) || !__builtin_isfinite(s);
        const __m512 first = _mm512_set1_ps(fold ? folded : 0x1p120f);
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        for (int64_t k = k0; k < k1; k += 16) {
            const __mmask16 m = k1 - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k1 - k)) - 1u);
            __m512 v = _mm512_mul_ps(e4m3x16_f32_nan(row + k, m), first);
            if (!fold) v = _mm512_mul_ps(v, _mm512_set1_ps(s));
            cumulo_bf16::store16(out + k, v, m);
        }
    }
}

CUMULO_DEQUANT_BF16 void fp8_dequant_bf16(const uint8_t* codes, int64_t N, int64_t K, const Scales& sc, int64_t bn,
                                          int64_t bk, uint16_t* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) fp8_dequant_row_bf16(codes + n * K, K, sc, n / bn, bk, out + n * K);
}

// The exponent of a power-of-two scale, if value x scale stays a normal bf16 for every E4M3 magnitude
// (2^-9 .. 448 < 2^9): then scaling a bf16 is adding to its exponent field, which is exact.
inline bool pow2_exponent(float s, int& e) {
    uint32_t u;
    memcpy(&u, &s, 4);
    const int field = (int)((u >> 23) & 0xFF);
    e = field - 127;
    return (u & 0x7FFFFF) == 0 && field != 0 && e >= -117 && e <= 118;
}

// Whether every block scale passes pow2_exponent, so fp8_decode_row_bf16 scales exactly (one pass over the scale
// table per call: a few thousand entries at most for fp32 scales, N x K / 32 bytes for MX's E8M0 ones).
bool scales_pow2(const Scales& sc, int64_t row_blocks) {
    const int64_t n = row_blocks * sc.cols;
    if (sc.e8m0) {  // E8M0 code c is 2^(c - 127): in range for codes 10 .. 245 (255, NaN, is out of it)
        uint8_t lo = 255, hi = 0;
        for (int64_t i = 0; i < n; ++i) {
            lo = sc.e8m0[i] < lo ? sc.e8m0[i] : lo;
            hi = sc.e8m0[i] > hi ? sc.e8m0[i] : hi;
        }
        return lo >= 10 && hi <= 245;
    }
    int e = 0;
    for (int64_t i = 0; i < n; ++i)
        if (!pow2_exponent(sc.f32[i], e)) return false;
    return true;
}

// One row of E4M3 codes -> bf16 in the lane order of table8_bf16_64 (x permuted by permute_x), K rounded up to
// 64 (zeros past K), each value times its block scale, which must pass pow2_exponent (scales_pow2).
CUMULO_BF16_VBMI void fp8_decode_row_bf16(const uint8_t* row, int64_t K, const Scales& sc, int64_t rb, int64_t bk,
                                          const Table8Bf16& t, uint16_t* out) {
    const __m512i mag = _mm512_set1_epi16(0x7FFF);  // zeros (and the padding) stay zero
    const auto put = [&](int64_t k, __m512i shift) CUMULO_BF16_VBMI {
        __m512i w0, w1;
        table8_64(row + k, K - k, t, w0, w1);
        w0 = _mm512_mask_add_epi16(w0, _mm512_test_epi16_mask(w0, mag), w0, shift);
        w1 = _mm512_mask_add_epi16(w1, _mm512_test_epi16_mask(w1, mag), w1, shift);
        _mm512_storeu_si512(out + k, w0);
        _mm512_storeu_si512(out + k + 32, w1);
    };
    int e = 0;
    if (bk % 64 == 0 || bk >= K) {  // one scale per block of whole 64-code chunks: e << 7 added to every bf16
        for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
            pow2_exponent(sc.at(rb, kb), e);
            const __m512i shift = _mm512_set1_epi16((short)(e * 128));
            for (int64_t k = k0; k < k0 + bk && k < K; k += 64) put(k, shift);
        }
        return;
    }
    // MX's blocks of 16 or 32: a scale per 128-bit lane l, which holds codes 16l .. 16l + 7 in w0 and 16l + 8 ..
    // 16l + 15 in w1.
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int64_t k = 0; k < K; k += 64) {
        alignas(16) int32_t add[4];
        for (int l = 0; l < 4; ++l) {
            e = 0;
            if (k + 16 * l < K) pow2_exponent(sc.at(rb, (k + 16 * l) / bk), e);
            add[l] = (int32_t)(((uint32_t)(e * 128) & 0xFFFF) * 0x10001u);
        }
        put(k, _mm512_permutexvar_epi32(spread, _mm512_castsi128_si512(_mm_load_si128((__m128i*)add))));
    }
}

// Whether fp8_linear_bf16 takes this K and column block.
bool bf16_takes(int64_t K, int64_t bk) { return bk % 64 == 0 || bk >= K || ((bk == 16 || bk == 32) && K % bk == 0); }

// bf16 x [M, K] -> bf16 y [M, N] through fp8_row_bf16 (fp8_rows_bf16[_mx] when M = 1 and the blocks allow),
// with E4M3's byte tables or, given mags, those of another 8-bit element. False if the block shape is not one
// it handles (bf16_takes).
bool fp8_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const Scales& sc,
                     int64_t bn, int64_t bk, uint16_t* y, int nthreads, const float* mags = nullptr,
                     bool twos = false) {
    if (!bf16_takes(K, bk)) return false;
    static const Table8Bf16 e4m3 = make_table8_bf16();
    const Table8Bf16 tables = mags ? make_table8_bf16(mags, twos) : e4m3;
    const int64_t xs = (K + 63) / 64 * 64;
    Scratch<uint16_t> xp(M * xs);
    for (int64_t m = 0; m < M; ++m) permute_x(x + m * K, K, xp.data() + m * xs);
    if (!mags && M >= kDecodeOnceRows && scales_pow2(sc, (N + bn - 1) / bn)) {
        const auto decode = [&](int64_t n0, int64_t nr, uint16_t* w) {
            for (int64_t r = 0; r < nr; ++r)
                fp8_decode_row_bf16(codes + (n0 + r) * K, K, sc, (n0 + r) / bn, bk, tables, w + r * xs);
        };
        cumulo_tile::decode_tiles(xp.data(), M, xs, N, decode, y, nthreads);
        return true;
    }
    const bool mx = bk == 32 && K % 32 == 0 && K > 32;
    if (M == 1 && (bk % 64 == 0 || bk >= K || mx)) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t g = 0; g < (N + NR - 1) / NR; ++g) {
            const int64_t n0 = g * NR, nr = N - n0 < NR ? N - n0 : NR;
            float out[NR];
            for (int64_t r = 0; r < nr; r += nr == NR ? NR : 1) {
                const uint8_t* rows = codes + (n0 + r) * K;
                if (nr == NR && mx) fp8_rows_bf16_mx<NR>(xp.data(), K, rows, sc, n0, bn, tables, out);
                else if (nr == NR) fp8_rows_bf16<NR>(xp.data(), K, rows, sc, n0, bn, bk, tables, out);
                else if (mx) fp8_rows_bf16_mx<1>(xp.data(), K, rows, sc, n0 + r, bn, tables, out + r);
                else fp8_rows_bf16<1>(xp.data(), K, rows, sc, n0 + r, bn, bk, tables, out + r);
            }
            for (int64_t r = 0; r < nr; ++r) y[n0 + r] = from_float(out[r]);
        }
        return true;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB];
        const uint8_t* row = codes + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const uint16_t* xm = xp.data() + m0 * xs;
            switch (mb) {
                case 1: fp8_row_bf16<1>(xm, xs, K, row, sc, n / bn, bk, tables, out); break;
                case 2: fp8_row_bf16<2>(xm, xs, K, row, sc, n / bn, bk, tables, out); break;
                case 3: fp8_row_bf16<3>(xm, xs, K, row, sc, n / bn, bk, tables, out); break;
                default: fp8_row_bf16<4>(xm, xs, K, row, sc, n / bn, bk, tables, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = from_float(out[i]);
        }
    }
    return true;
}

}  // namespace

// y = x W^T. x [M, K] and y [M, N]: fp32, or bf16 when bf16 = 1; codes [N, K] E4M3; scales fp32 (scales_f32)
// or E8M0 (scales_e8m0; the other null). wide_ok = 0 keeps the AVX2 path (tests use it).
#define CUMULO_FP8_LINEAR(X)                                                                                   \
    X(const void*, x) X(int64_t, M) X(int64_t, K) X(const uint8_t*, codes) X(int64_t, N) X(const float*, scales_f32) \
        X(const uint8_t*, scales_e8m0) X(int64_t, bn) X(int64_t, bk) X(void*, y) X(int, threads) X(int, wide_ok)     \
            X(int, bf16)
CUMULO_KERNEL(cumulo_fp8_linear, CUMULO_FP8_LINEAR) {
    const int64_t M = a.M, K = a.K, N = a.N;
    const Scales sc{a.scales_f32, a.scales_e8m0, (K + a.bk - 1) / a.bk};
    if (a.bf16 && a.wide_ok && cumulo_cpu::avx512_bf16_vbmi()) {
        if (fp8_linear_bf16((const uint16_t*)a.x, M, K, a.codes, N, sc, a.bn, a.bk, (uint16_t*)a.y, a.threads))
            return 0;
    }
    Bf16Io io;
    const float* xf = io.x(a.x, M * K, a.bf16);
    float* yf = io.y(a.y, M * N, a.bf16);
    if (a.wide_ok && cumulo_cpu::avx512()) fp8_rows<Fp8Avx512>(xf, M, K, a.codes, N, sc, a.bn, a.bk, yf, a.threads);
    else fp8_rows<Fp8Avx2>(xf, M, K, a.codes, N, sc, a.bn, a.bk, yf, a.threads);
    io.finish(a.y, M * N, a.bf16);
    return 0;
}

// Dequantize E4M3 codes [N, K] with block scales (as above) into out [N, K]: fp32 (the prefill path: then one
// sgemm), or bf16 with bf16 = 1 where the CPU has AVX512-BF16 (else returns 1, nothing written).
#define CUMULO_FP8_DEQUANT(X)                                                                                   \
    X(const uint8_t*, codes) X(int64_t, N) X(int64_t, K) X(const float*, scales_f32) X(const uint8_t*, scales_e8m0) \
        X(int64_t, bn) X(int64_t, bk) X(void*, out) X(int, threads) X(int, bf16)
CUMULO_KERNEL(cumulo_fp8_dequant, CUMULO_FP8_DEQUANT) {
    const int64_t N = a.N, K = a.K, bn = a.bn, bk = a.bk;
    const Scales sc{a.scales_f32, a.scales_e8m0, (K + bk - 1) / bk};
    if (a.bf16) {
        if (!cumulo_cpu::avx512_bf16()) return 1;
        fp8_dequant_bf16(a.codes, N, K, sc, bn, bk, (uint16_t*)a.out, a.threads);
        return 0;
    }
    const uint8_t* codes = a.codes;
    float* out = (float*)a.out;
    float table[256];
    for (int c = 0; c < 256; ++c) table[c] = e4m3_value((uint8_t)c);
#pragma omp parallel for num_threads(a.threads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k0 = 0; k0 < K; k0 += bk) {
            const float s = sc.at(n / bn, k0 / bk);
            for (int64_t k = k0; k < k0 + bk && k < K; ++k) out[n * K + k] = table[codes[n * K + k]] * s;
        }
    return 0;
}

// Other 8-bit elements through the FP8 bf16 kernel (codes looked up as exact bf16): HiF8 (sign-magnitude, its 128
// magnitudes all fit bf16's 8 significant bits) and MX INT8 (twos = 1: two's complement, looked up by magnitude).
// bf16 x and y; mags: the value of each magnitude code; the rest as cumulo_fp8_linear's. Returns 1 (nothing
// written) where this CPU lacks AVX512-BF16 + VBMI or the blocks are of a shape the kernel does not take
// (cumulo_table8_takes); the caller then uses the LUT kernel (lut.cpp).
#define CUMULO_TABLE8_LINEAR_BF16(X)                                                                           \
    X(const void*, x) X(int64_t, M) X(int64_t, K) X(const uint8_t*, codes) X(int64_t, N) X(const float*, scales_f32) \
        X(const uint8_t*, scales_e8m0) X(int64_t, bn) X(int64_t, bk) X(void*, y) X(int, threads)                    \
            X(const float*, mags) X(int, twos)
CUMULO_KERNEL(cumulo_table8_linear_bf16, CUMULO_TABLE8_LINEAR_BF16) {
    if (!cumulo_cpu::avx512_bf16_vbmi()) return 1;
    const Scales sc{a.scales_f32, a.scales_e8m0, (a.K + a.bk - 1) / a.bk};
    const bool done = fp8_linear_bf16((const uint16_t*)a.x, a.M, a.K, a.codes, a.N, sc, a.bn, a.bk, (uint16_t*)a.y,
                                      a.threads, a.mags, a.twos != 0);
    return done ? 0 : 1;
}

// 1 where cumulo_table8_linear_bf16 runs for this K and column block (a decode graph records it then), else 0.
#define CUMULO_TABLE8_TAKES(X) X(int64_t, K) X(int64_t, bk)
CUMULO_KERNEL(cumulo_table8_takes, CUMULO_TABLE8_TAKES) {
    return cumulo_cpu::avx512_bf16_vbmi() && bf16_takes(a.K, a.bk);
}

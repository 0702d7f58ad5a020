// int8 x int8 -> int32 GEMM over pixels for a 1x1 conv, with its quantize and dequantize inside
// (cumulo.platform.kernels.int8_gemm): y = relu6?(q(x) W^T * s_row * s_channel + bias + r), x fp32 [M, K].
//
// Why: with torch the int8 1x1 conv is eight eager passes over each activation (range, divide, round, cast, GEMM,
// cast, scale-and-bias, clamp), and those passes, not the GEMM, took most of the int8 frame (docs/edge.md). Here
// a tile of rows is quantized into L1 (prologue), multiplied, and each int32 sum leaves as the finished fp32
// output (epilogue): x is read once and y written once.
//
// Activations (the two kinds Int8Pointwise has):
// - relu6 = 1: inputs are ReLU6 outputs (or anything: the codes are clamped to [0, 255], which is quantizing
//   relu6(x)), one fixed step 6/255: code = clamp(round(x * (255/6)), 0, 255), unsigned (u8) as they are, all
//   eight bits used (vpdpbusd multiplies u8 by s8, so no offset; 4 x 255 x 127 per lane, no overflow).
// - relu6 = 0: a symmetric step per row, amax / 127: code = round(x / step) in [-127, 127], sent as code + 128
//   (u8), and 128 x (the weight's column sum) taken off the sum afterwards.
// Rounding is to nearest even and the divide is a true divide, as torch's path computes them, so the codes are
// the same as torch's and the int32 sums are equal; the outputs differ only by fp32 summation order.
//
// Weights: int8 codes packed by Python (int8_gemm.pack) as blocks of 16 output channels x 4 k: byte
// ((nb * Kg + kg) * 16 + j) * 4 + t is codes[16 nb + j, 4 kg + t], zero beyond N and K (Kg = ceil(K / 4)): one
// 64-byte load is one vpdpbusd operand (u8 x s8 -> s32, four products per lane).
// Paths: AVX512-VNNI (vpdpbusd, 6 rows x 64 channels of sums in registers), chosen at run time; else portable
// C++ over the same packed bytes (exact, but 5-20x slower than torch's oneDNN int8 path, so int8_gemm.bind offers
// the kernel only where VNNI runs). The output may be the inside of a zero-padded map (yw, yrs: the next conv's
// padding without a pass of its own). OpenMP over tiles of rows. The entry point as kernel.h declares it.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_features.h"
#include "kernel.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int kBlockN = 16;  // output channels per packed block (one zmm of int32 sums)
constexpr int kGroupK = 4;   // k per vpdpbusd lane
constexpr int kRows = 6;     // rows of x per tile in registers
constexpr int kBlocks = 4;   // packed blocks per tile: 6 x 4 sums + 4 weights + 1 broadcast of 32 zmm
constexpr int kRelu6Max = 255;  // relu6 inputs: u8 codes [0, 255]
constexpr float kRelu6Step = 255.0f / 6.0f;  // 42.5 exactly, what torch's x * (255 / 6.0) multiplies by
constexpr float kRelu6Dequant = 6.0f / 255.0f;  // the step a code stands for (torch's 6 / 255.0 in fp32)

struct Gemm {
    const float* x;
    int64_t M, K, xs;
    const int8_t* w;
    const int32_t* wsum;
    int64_t N;
    const float* scale;
    const float* bias;
    const float* r;
    int64_t rs;
    float* y;
    int64_t ys, yw, yrs;  // pixel m of the output at y + (m / yw) yrs + (m % yw) ys: image rows apart
    int32_t* acc;  // not null: write the int32 sums [M, N] (stride ys) and nothing else
    bool relu6_in, relu6_out;
    int64_t Kg, Kp;  // groups of 4 along K; Kp = 4 Kg, the padded length of a quantized row
};

// Scratch rows of codes, 64-byte aligned (one per thread).
struct Codes {
    uint8_t* p = nullptr;
    explicit Codes(int64_t n) {
        const size_t bytes = ((size_t)n + 63) / 64 * 64;
        p = (uint8_t*)aligned_alloc(64, bytes ? bytes : 64);
    }
    ~Codes() { free(p); }
    Codes(const Codes&) = delete;
    Codes& operator=(const Codes&) = delete;
};

// The row's step: fixed for relu6 inputs, else max|x| / 127 as torch computes it (clamped at 1e-12).
inline float row_step_amax(float amax) { return fmaxf(amax, 1e-12f) / 127.0f; }

// Where output row (pixel) m starts: rows follow one another (yw = M), or images rows of yw pixels lie yrs apart,
// as in a padded map whose border the caller zeroes.
inline int64_t out_at(const Gemm& g, int64_t m) { return (m / g.yw) * g.yrs + (m % g.yw) * g.ys; }

// --- portable ---------------------------------------------------------------------------------------------

float quantize_row(const float* x, int64_t K, int64_t Kp, bool relu6, uint8_t* out) {
    if (relu6) {
        for (int64_t k = 0; k < K; ++k) {
            const float q = nearbyintf(x[k] * kRelu6Step);
            out[k] = (uint8_t)(q < 0.0f ? 0.0f : q > (float)kRelu6Max ? (float)kRelu6Max : q);
        }
        memset(out + K, 0, (size_t)(Kp - K));
        return kRelu6Dequant;
    }
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = fmaxf(amax, fabsf(x[k]));
    const float step = row_step_amax(amax);
    for (int64_t k = 0; k < K; ++k) {
        const float q = nearbyintf(x[k] / step);
        out[k] = (uint8_t)(int)((q < -127.0f ? -127.0f : q > 127.0f ? 127.0f : q) + 128.0f);
    }
    memset(out + K, 128, (size_t)(Kp - K));
    return step;
}

// The finished output of one sum: sum (int32, offset taken off) -> fp32, as Int8Pointwise's torch path.
inline float finish(const Gemm& g, int64_t m, int64_t n, int32_t sum, float step) {
    float v;
    if (g.relu6_in)
        v = (float)sum * (g.scale[n] * kRelu6Dequant) + g.bias[n];
    else
        v = (float)sum * step * g.scale[n] + g.bias[n];
    if (g.r) v += g.r[m * g.rs + n];
    if (g.relu6_out) v = fminf(fmaxf(v, 0.0f), 6.0f);
    return v;
}

void rows_portable(const Gemm& g, int64_t m0, int64_t mb, uint8_t* q, float* steps) {
    for (int64_t i = 0; i < mb; ++i)
        steps[i] = quantize_row(g.x + (m0 + i) * g.xs, g.K, g.Kp, g.relu6_in, q + i * g.Kp);
    const int64_t blocks = (g.N + kBlockN - 1) / kBlockN;
    for (int64_t nb = 0; nb < blocks; ++nb) {
        const int8_t* wb = g.w + nb * g.Kg * kBlockN * kGroupK;
        const int64_t n0 = nb * kBlockN, nn = g.N - n0 < kBlockN ? g.N - n0 : kBlockN;
        for (int64_t i = 0; i < mb; ++i) {
            int32_t sums[kBlockN] = {0};
            const uint8_t* qi = q + i * g.Kp;
            for (int64_t kg = 0; kg < g.Kg; ++kg)
                for (int j = 0; j < kBlockN; ++j)
                    for (int t = 0; t < kGroupK; ++t)
                        sums[j] += (int32_t)qi[kg * kGroupK + t] * (int32_t)wb[(kg * kBlockN + j) * kGroupK + t];
            const int64_t m = m0 + i;
            for (int64_t j = 0; j < nn; ++j) {
                const int32_t s = g.relu6_in ? sums[j] : sums[j] - 128 * g.wsum[n0 + j];
                if (g.acc)
                    g.acc[out_at(g, m) + n0 + j] = s;
                else
                    g.y[out_at(g, m) + n0 + j] = finish(g, m, n0 + j, s, steps[i]);
            }
        }
    }
}

// --- AVX512-VNNI ------------------------------------------------------------------------------------------

#if defined(__x86_64__)
#define CUMULO_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

CUMULO_VNNI inline __mmask16 tail16(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

// One row into u8 codes: 16 lanes at a time, masked at the end; the padding to Kp takes the code of zero.
CUMULO_VNNI float quantize_row_512(const float* x, int64_t K, int64_t Kp, bool relu6, uint8_t* out) {
    if (relu6) {
        const __m512 s = _mm512_set1_ps(kRelu6Step);
        const __m512i lo = _mm512_setzero_si512(), hi = _mm512_set1_epi32(kRelu6Max);
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 m = tail16(K - k);
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), s));  // to even
            _mm_mask_storeu_epi8(out + k, m, _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi)));
        }
        memset(out + K, 0, (size_t)(Kp - K));
        return kRelu6Dequant;
    }
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16)
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail16(K - k), x + k)));
    const float step = row_step_amax(_mm512_reduce_max_ps(amax));
    const __m512 s = _mm512_set1_ps(step);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = tail16(K - k);
        __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), s));
        q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), off);
        _mm_mask_storeu_epi8(out + k, m, _mm512_cvtepi32_epi8(q));
    }
    memset(out + K, 128, (size_t)(Kp - K));
    return step;
}

// The sums of R rows x C blocks of 16 channels over all of K, kept in registers, into out [R][C][16].
// The sums of R rows x C blocks of 16 channels over all of K, in registers, written to out [R][C][16] once.
// Every loop over R and C is unrolled by pragma: GCC 12 otherwise leaves the sums an array in memory, stored on
// every step of k, for R >= 4 (then the GEMM ran at half the speed).
template <int R, int C>
CUMULO_VNNI inline void sums_512(const Gemm& g, const uint8_t* q, int64_t nb0, int32_t* out) {
    __m512i s[R][C];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) s[i][c] = _mm512_setzero_si512();
    const int64_t bstride = g.Kg * kBlockN * kGroupK;  // bytes per packed block
    const int8_t* wb = g.w + nb0 * bstride;
    for (int64_t kg = 0; kg < g.Kg; ++kg, wb += 64, q += kGroupK) {
        __m512i w[C];
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) w[c] = _mm512_load_si512((const void*)(wb + c * bstride));
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m512i a = _mm512_set1_epi32(*(const int32_t*)(q + i * g.Kp));
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c) s[i][c] = _mm512_dpbusd_epi32(s[i][c], a, w[c]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) _mm512_store_si512((void*)(out + (i * C + c) * kBlockN), s[i][c]);
}

// R rows x C blocks: the sums (sums_512), then each leaves as its finished output.
template <int R, int C>
CUMULO_VNNI void tile_512(const Gemm& g, int64_t m0, const uint8_t* q, const float* steps, int64_t nb0) {
    alignas(64) int32_t sums[R * C * kBlockN];
    sums_512<R, C>(g, q, nb0, sums);
    const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.0f);
    const __m512 relu6_step = _mm512_set1_ps(kRelu6Dequant);
    for (int c = 0; c < C; ++c) {
        const int64_t n0 = (nb0 + c) * kBlockN;
        const __mmask16 mask = tail16(g.N - n0);
        const __m512i off = g.relu6_in ? _mm512_setzero_si512()
                                       : _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask, g.wsum + n0), 7);
        __m512 sc = _mm512_maskz_loadu_ps(mask, g.scale + n0), b = zero;
        if (g.acc == nullptr) {
            b = _mm512_maskz_loadu_ps(mask, g.bias + n0);
            if (g.relu6_in) sc = _mm512_mul_ps(sc, relu6_step);
        }
        for (int i = 0; i < R; ++i) {
            const int64_t m = m0 + i, at = out_at(g, m) + n0;
            const __m512i sum = _mm512_sub_epi32(_mm512_load_si512((const void*)(sums + (i * C + c) * kBlockN)), off);
            if (g.acc) {
                _mm512_mask_storeu_epi32(g.acc + at, mask, sum);
                continue;
            }
            __m512 v = _mm512_cvtepi32_ps(sum);
            if (!g.relu6_in) v = _mm512_mul_ps(v, _mm512_set1_ps(steps[i]));
            v = _mm512_fmadd_ps(v, sc, b);
            if (g.r) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, g.r + m * g.rs + n0));
            if (g.relu6_out) v = _mm512_min_ps(_mm512_max_ps(v, zero), six);
            _mm512_mask_storeu_ps(g.y + at, mask, v);
        }
    }
}

template <int R>
CUMULO_VNNI void blocks_512(const Gemm& g, int64_t m0, const uint8_t* q, const float* steps) {
    const int64_t blocks = (g.N + kBlockN - 1) / kBlockN;
    int64_t nb = 0;
    for (; nb + kBlocks <= blocks; nb += kBlocks) tile_512<R, kBlocks>(g, m0, q, steps, nb);
    switch (blocks - nb) {
        case 3: tile_512<R, 3>(g, m0, q, steps, nb); break;
        case 2: tile_512<R, 2>(g, m0, q, steps, nb); break;
        case 1: tile_512<R, 1>(g, m0, q, steps, nb); break;
        default: break;
    }
}

CUMULO_VNNI void rows_512(const Gemm& g, int64_t m0, int64_t mb, uint8_t* q, float* steps) {
    for (int64_t i = 0; i < mb; ++i)
        steps[i] = quantize_row_512(g.x + (m0 + i) * g.xs, g.K, g.Kp, g.relu6_in, q + i * g.Kp);
    switch (mb) {
        case 1: blocks_512<1>(g, m0, q, steps); break;
        case 2: blocks_512<2>(g, m0, q, steps); break;
        case 3: blocks_512<3>(g, m0, q, steps); break;
        case 4: blocks_512<4>(g, m0, q, steps); break;
        case 5: blocks_512<5>(g, m0, q, steps); break;
        default: blocks_512<kRows>(g, m0, q, steps); break;
    }
}
#endif

bool vnni() {
#if defined(__x86_64__)
    return cumulo_cpu::has(cumulo_cpu::kAvx512 | cumulo_cpu::kVnni);
#else
    return false;
#endif
}

}  // namespace

// x fp32 [M, K] (row stride xs); w packed int8 codes (above), wsum int32 [N] (each channel's code sum); scale,
// bias fp32 [N]; r fp32 [M, N] (row stride rs) added before relu6_out, or null; y fp32 [M, N] (row stride ys),
// or, with yw < M, image rows of yw pixels yrs floats apart (the inside of a padded map; yw = 0: rows follow
// one another). acc not null: the int32 sums go there (laid out as y) instead of y (tests). path -1: the best
// this CPU runs, 0: portable. Returns 1 where the packed weight cannot be read as 64-byte loads (w not 64-byte
// aligned).
#define CUMULO_INT8_GEMM(X)                                                                                 \
    X(const float*, x) X(int64_t, M) X(int64_t, K) X(int64_t, xs) X(const int8_t*, w) X(const int32_t*, wsum) \
        X(int64_t, N) X(const float*, scale) X(const float*, bias) X(int, relu6_in) X(int, relu6_out)         \
            X(const float*, r) X(int64_t, rs) X(float*, y) X(int64_t, ys) X(int64_t, yw) X(int64_t, yrs)       \
                X(int32_t*, acc) X(int, threads) X(int, path)
CUMULO_KERNEL(cumulo_int8_gemm, CUMULO_INT8_GEMM) {
    const int64_t Kg = (a.K + kGroupK - 1) / kGroupK;
    const int64_t yw = a.yw > 0 ? a.yw : (a.M > 0 ? a.M : 1), yrs = a.yw > 0 ? a.yrs : yw * a.ys;
    const Gemm g{a.x, a.M, a.K, a.xs, a.w, a.wsum, a.N, a.scale, a.bias, a.r, a.rs, a.y, a.ys, yw, yrs, a.acc,
                 a.relu6_in != 0, a.relu6_out != 0, Kg, Kg * kGroupK};
    const bool wide = a.path != 0 && vnni();
    if (wide && ((uintptr_t)a.w & 63)) return 1;
    const int64_t tiles = (a.M + kRows - 1) / kRows;
#pragma omp parallel num_threads(a.threads) if (a.threads > 1 && a.M * a.N * a.K >= (1 << 20))
    {
        Codes q(kRows * g.Kp);
        float steps[kRows];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t m0 = t * kRows, mb = a.M - m0 < kRows ? a.M - m0 : kRows;
#if defined(__x86_64__)
            if (wide) {
                rows_512(g, m0, mb, q.p, steps);
                continue;
            }
#endif
            rows_portable(g, m0, mb, q.p, steps);
        }
    }
    return 0;
}

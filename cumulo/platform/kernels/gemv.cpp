// Skinny bf16 and fp32 matmuls for CPUs (cumulo.platform.kernels.gemv): y = x W^T for few rows of x (decode),
// W [N, K]. (The fp32 variant is described beside its row loop below.)
//
// Why: a decode step multiplies one activation row by every weight matrix, so it should run at the memory's
// read bandwidth. PyTorch's bf16 path on CPU reaches well under half of it at one row (it widens bf16 to fp32
// in a generic loop), and is slower per byte than its own fp32 path. Here each weight row is read once, as is:
// - AVX512-BF16 (vdpbf16ps): 32 bf16 products per instruction, accumulated in fp32; K tails by masked loads.
// - otherwise AVX2: bf16 widened to fp32 by a shift (exact), then FMA.
// The path is chosen at run time (__builtin_cpu_supports), so one build runs on any x86-64 with AVX2.
// Outputs are fp32 sums rounded once to bf16 (round to nearest even), as a bf16 GEMM with fp32 accumulation
// does. OpenMP over output rows (the libgomp torch has loaded). Plain C ABI, called through ctypes.

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

namespace {

constexpr int kRows = 4;  // rows of x per pass over a weight row (accumulators stay in registers)
constexpr int kAhead = 32768;  // bytes of weights prefetched ahead of the loads (into L2: _MM_HINT_T1)

using cumulo_bf16::to_float;

template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void row_avx512(const uint16_t* x, int64_t xs,
                                                                       int64_t K, const uint16_t* w,
                                                                       float* out) {
    __m512 a0[R], a1[R];
    for (int i = 0; i < R; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        // Rows a thread reads are contiguous: fetch ahead across row ends, where the hardware prefetcher
        // would otherwise stall.
        _mm_prefetch((const char*)(w + k) + kAhead, _MM_HINT_T1);
        _mm_prefetch((const char*)(w + k) + kAhead + 64, _MM_HINT_T1);
        const __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 32);
        for (int i = 0; i < R; ++i) {
            const uint16_t* xr = x + i * xs + k;
            a0[i] = _mm512_dpbf16_ps(a0[i], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xr));
            a1[i] = _mm512_dpbf16_ps(a1[i], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xr + 32));
        }
    }
    for (; k < K; k += 32) {
        const int64_t left = K - k;
        const __mmask32 m = left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1u);
        const __m512i w0 = _mm512_maskz_loadu_epi16(m, w + k);
        for (int i = 0; i < R; ++i)
            a0[i] = _mm512_dpbf16_ps(a0[i], (__m512bh)w0, (__m512bh)_mm512_maskz_loadu_epi16(m, x + i * xs + k));
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
}

inline __m256 widen8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 weights or activations as fp32: bf16 widened by a shift (exact), fp32 loaded as is.
inline __m256 load8(const uint16_t* p) { return widen8(p); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

template <int R, typename T>
void row_avx2(const T* x, int64_t xs, int64_t K, const T* w, float* out) {
    __m256 a0[R], a1[R];
    float tail[R];
    for (int i = 0; i < R; ++i) a0[i] = a1[i] = _mm256_setzero_ps(), tail[i] = 0.0f;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        _mm_prefetch((const char*)(w + k) + kAhead, _MM_HINT_T1);
        const __m256 w0 = load8(w + k), w1 = load8(w + k + 8);
        for (int i = 0; i < R; ++i) {
            a0[i] = _mm256_fmadd_ps(w0, load8(x + i * xs + k), a0[i]);
            a1[i] = _mm256_fmadd_ps(w1, load8(x + i * xs + k + 8), a1[i]);
        }
    }
    for (; k < K; ++k)
        for (int i = 0; i < R; ++i) tail[i] += cumulo_bf16::load(w, k) * cumulo_bf16::load(x, i * xs + k);
    for (int i = 0; i < R; ++i) out[i] = hsum(_mm256_add_ps(a0[i], a1[i])) + tail[i];
}

template <int R>
inline void row(bool wide, const uint16_t* x, int64_t xs, int64_t K, const uint16_t* w, float* out) {
    if (wide) row_avx512<R>(x, xs, K, w, out);
    else row_avx2<R>(x, xs, K, w, out);
}

// fp32 weights (CPUs without native bf16 serve dense models in fp32): the same loop with FMA, 16 (AVX-512) or
// 8 (AVX2) products per instruction. torch's fp32 matmul reads one row of x against W at a fraction of the
// memory's bandwidth on some CPUs (9 GB/s of 28 on an AMD EPYC here), which is what makes this worth having.
template <int R>
__attribute__((target("avx512f"))) void row_f32_avx512(const float* x, int64_t xs, int64_t K, const float* w,
                                                        float* out) {
    __m512 a0[R], a1[R];
    for (int i = 0; i < R; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char*)(w + k) + kAhead, _MM_HINT_T1);
        _mm_prefetch((const char*)(w + k) + kAhead + 64, _MM_HINT_T1);
        const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
        for (int i = 0; i < R; ++i) {
            a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * xs + k), a0[i]);
            a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * xs + k + 16), a1[i]);
        }
    }
    for (; k < K; k += 16) {
        const int64_t left = K - k;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __m512 w0 = _mm512_maskz_loadu_ps(m, w + k);
        for (int i = 0; i < R; ++i) a0[i] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + i * xs + k), a0[i]);
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
}

template <int R>
inline void row(bool wide, const float* x, int64_t xs, int64_t K, const float* w, float* out) {
    if (wide) row_f32_avx512<R>(x, xs, K, w, out);
    else row_avx2<R>(x, xs, K, w, out);
}

// y [M, N] = x [M, K] W^T (+ bias) for either storage type: OpenMP over weight rows, kRows rows of x per pass.
template <typename T>
void linear(const T* x, int64_t M, int64_t K, int64_t xs, const T* w, int64_t N, int64_t ws, const T* bias,
            void* y, int nthreads, bool wide, bool y_fp32) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const T* wr = w + n * ws;
        const float b = bias ? cumulo_bf16::load(bias, n) : 0.0f;
        float out[kRows];
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
            const int64_t mb = M - m0 < kRows ? M - m0 : kRows;
            const T* xm = x + m0 * xs;
            switch (mb) {
                case 1: row<1>(wide, xm, xs, K, wr, out); break;
                case 2: row<2>(wide, xm, xs, K, wr, out); break;
                case 3: row<3>(wide, xm, xs, K, wr, out); break;
                default: row<4>(wide, xm, xs, K, wr, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) {
                if (y_fp32) ((float*)y)[(m0 + i) * N + n] = out[i] + b;
                else cumulo_bf16::store((T*)y, (m0 + i) * N + n, out[i] + b);
            }
        }
    }
}

}  // namespace

extern "C" {

// 1 if this CPU runs the AVX512-BF16 path, 0 for the AVX2 path.
int cumulo_bf16_linear_wide(void) {
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") ? 1 : 0;
}

// x bf16 [M, K] with row stride xs; w bf16 [N, K] with row stride ws; bias bf16 [N] or null; y [M, N] bf16, or
// fp32 with y_fp32 = 1 (an output head's logits, unrounded).
// path: -1 the best this CPU has, 0 AVX2 (tests use it to cover the fallback on AVX-512 machines).
void cumulo_bf16_linear(const uint16_t* x, int64_t M, int64_t K, int64_t xs, const uint16_t* w, int64_t N,
                        int64_t ws, const uint16_t* bias, void* y, int nthreads, int path, int y_fp32) {
    linear(x, M, K, xs, w, N, ws, bias, y, nthreads, path != 0 && cumulo_bf16_linear_wide() != 0, y_fp32 != 0);
}

// 1 if this CPU runs the AVX-512 fp32 path, 0 for AVX2.
int cumulo_f32_linear_wide(void) { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

// The same for fp32 x, w, bias and y.
void cumulo_f32_linear(const float* x, int64_t M, int64_t K, int64_t xs, const float* w, int64_t N, int64_t ws,
                       const float* bias, float* y, int nthreads, int path) {
    linear(x, M, K, xs, w, N, ws, bias, y, nthreads, path != 0 && cumulo_f32_linear_wide() != 0, true);
}

// The decode-graph forms (cumulo.platform.kernels.graph): a = {x, M, K, xs, w, N, ws, bias, y, threads, y_fp32};
// the fp32 one ignores y_fp32.
void cumulo_bf16_linear_op(const int64_t* a) {
    cumulo_bf16_linear((const uint16_t*)a[0], a[1], a[2], a[3], (const uint16_t*)a[4], a[5], a[6],
                       (const uint16_t*)a[7], (void*)a[8], (int)a[9], -1, (int)a[10]);
}

void cumulo_f32_linear_op(const int64_t* a) {
    cumulo_f32_linear((const float*)a[0], a[1], a[2], a[3], (const float*)a[4], a[5], a[6], (const float*)a[7],
                      (float*)a[8], (int)a[9], -1);
}

}  // extern "C"

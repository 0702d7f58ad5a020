// Skinny bf16 and fp32 matmuls for CPUs (cumulo.platform.kernels.gemv): y = x W^T for few rows of x (decode),
// W [N, K].
//
// Why: a decode step multiplies one activation row (or a few) by every weight matrix, so it should run at the
// memory's read bandwidth. PyTorch's bf16 path on CPU reaches well under half of it at one row (it widens bf16
// to fp32 in a generic loop), and its fp32 path reads one row against W at a fraction of the bandwidth on some
// CPUs (docs/benchmarks.md, "Figures behind the code's constants"). Here each weight row is read once, as is:
// - AVX-512: a tile of weight rows times up to kRows rows of x, all sums in registers. Above kTileRowsAt rows
//   of x the tile takes kTileN weight rows, so each x load feeds kTileN products and x is read once per kTileN
//   weight rows (reading it once per weight row made 16 rows of K = 2048 bf16 slower than 8: x no longer fit
//   in L1 and came from L2 for every weight row). bf16 weights by AVX512-BF16 (vdpbf16ps, 32 products per
//   instruction, fp32 sums), fp32 by FMA (16).
// - otherwise AVX2: one weight row against up to kRows rows of x; bf16 widened to fp32 by a shift (exact).
// The path is chosen at run time (cpu_features.h), so one build runs on any x86-64 with AVX2.
// bf16 outputs are fp32 sums rounded once to bf16 (round to nearest even), as a bf16 GEMM with fp32
// accumulation does. OpenMP over weight rows (the libgomp torch has loaded). Entry points as kernel.h declares
// them.

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "cpu_features.h"
#include "kernel.h"
#include "simd.h"
#include "tile.h"

namespace {

using cumulo_simd::hsum;

using cumulo_tile::Bf16Ops;
using cumulo_tile::emit;
using cumulo_tile::F32Ops;
using cumulo_tile::kAhead;
using cumulo_tile::kRows;
using cumulo_tile::kTileN;
using cumulo_tile::tile_rows;

inline __m256 widen8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
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

// The AVX-512 path: OpenMP over tiles of `nt` weight rows (a last partial tile row by row). Up to kTileRowsAt rows
// of x, one weight row at a time: the weights stream as one sequential run per thread, which measured faster
// than interleaving four rows while memory-bound (1-4 rows of x: 20-35% faster on Zen 5). More rows of x are
// bound by reading x instead, and tiles of kTileN weight rows read it a quarter as often (16 rows: 20% faster).
constexpr int64_t kTileRowsAt = 8;

template <typename Ops, int NT>
void tiled_rows(const typename Ops::T* x, int64_t M, int64_t K, int64_t xs, const typename Ops::T* w, int64_t N,
                int64_t ws, const typename Ops::T* bias, void* y, int nthreads, bool y_fp32) {
    const int64_t tiles = (N + NT - 1) / NT;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * NT, nr = N - n0 < NT ? N - n0 : NT;
        float out[kRows * NT];
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
            const int64_t mb = M - m0 < kRows ? M - m0 : kRows;
            if (nr == NT) {
                tile_rows<Ops, NT>(mb, x + m0 * xs, xs, K, w + n0 * ws, ws, out);
                emit(out, mb, NT, m0, n0, N, bias, y, y_fp32);
                continue;
            }
            for (int64_t j = 0; j < nr; ++j) {
                tile_rows<Ops, 1>(mb, x + m0 * xs, xs, K, w + (n0 + j) * ws, ws, out);
                emit(out, mb, 1, m0, n0 + j, N, bias, y, y_fp32);
            }
        }
    }
}

template <typename Ops>
void linear_tiled(const typename Ops::T* x, int64_t M, int64_t K, int64_t xs, const typename Ops::T* w, int64_t N,
                  int64_t ws, const typename Ops::T* bias, void* y, int nthreads, bool y_fp32) {
    if (M > kTileRowsAt) tiled_rows<Ops, kTileN>(x, M, K, xs, w, N, ws, bias, y, nthreads, y_fp32);
    else tiled_rows<Ops, 1>(x, M, K, xs, w, N, ws, bias, y, nthreads, y_fp32);
}

// The AVX2 path, for either storage type: OpenMP over weight rows, kRows rows of x per pass over each.
template <typename T>
void linear_rows(const T* x, int64_t M, int64_t K, int64_t xs, const T* w, int64_t N, int64_t ws, const T* bias,
                 void* y, int nthreads, bool y_fp32) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const T* wr = w + n * ws;
        float out[kRows];
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
            const int64_t mb = M - m0 < kRows ? M - m0 : kRows;
            const T* xm = x + m0 * xs;
            switch (mb) {
                case 1: row_avx2<1>(xm, xs, K, wr, out); break;
                case 2: row_avx2<2>(xm, xs, K, wr, out); break;
                case 3: row_avx2<3>(xm, xs, K, wr, out); break;
                default: row_avx2<4>(xm, xs, K, wr, out); break;
            }
            emit(out, mb, 1, m0, n, N, bias, y, y_fp32);
        }
    }
}

}  // namespace

// x [M, K] with row stride xs; w [N, K] with row stride ws; bias [N] or null; y [M, N] (rows contiguous).
// cumulo_bf16_linear: x, w, bias bf16; y bf16, or fp32 with y_fp32 = 1 (an output head's logits, unrounded).
// cumulo_f32_linear: all fp32. path: -1 the best this CPU has, 0 AVX2 (tests use it to cover the fallback on
// AVX-512 machines).
#define CUMULO_BF16_LINEAR(X)                                                                              \
    X(const uint16_t*, x) X(int64_t, M) X(int64_t, K) X(int64_t, xs) X(const uint16_t*, w) X(int64_t, N)    \
        X(int64_t, ws) X(const uint16_t*, bias) X(void*, y) X(int, threads) X(int, path) X(int, y_fp32)
CUMULO_KERNEL(cumulo_bf16_linear, CUMULO_BF16_LINEAR) {
    if (a.path != 0 && cumulo_cpu::avx512_bf16())
        linear_tiled<Bf16Ops>(a.x, a.M, a.K, a.xs, a.w, a.N, a.ws, a.bias, a.y, a.threads, a.y_fp32);
    else linear_rows(a.x, a.M, a.K, a.xs, a.w, a.N, a.ws, a.bias, a.y, a.threads, a.y_fp32 != 0);
    return 0;
}

#define CUMULO_F32_LINEAR(X)                                                                                  \
    X(const float*, x) X(int64_t, M) X(int64_t, K) X(int64_t, xs) X(const float*, w) X(int64_t, N) X(int64_t, ws) \
        X(const float*, bias) X(float*, y) X(int, threads) X(int, path)
CUMULO_KERNEL(cumulo_f32_linear, CUMULO_F32_LINEAR) {
    if (a.path != 0 && cumulo_cpu::avx512())
        linear_tiled<F32Ops>(a.x, a.M, a.K, a.xs, a.w, a.N, a.ws, a.bias, a.y, a.threads, true);
    else linear_rows(a.x, a.M, a.K, a.xs, a.w, a.N, a.ws, a.bias, a.y, a.threads, true);
    return 0;
}

// The AVX-512 register tile every skinny matmul here ends in: NR weight rows times MR rows of x, all sums in
// registers (gemv.cpp for dense weights; fp8.cpp and fp4.cpp once they have decoded a few weight rows into bf16,
// for batches: decode_tiles below). bf16 by AVX512-BF16 (vdpbf16ps, 32 products per instruction, fp32 sums),
// fp32 by FMA (16).
#pragma once

#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"
#include "simd.h"

namespace cumulo_tile {

constexpr int kRows = 4;  // rows of x per pass over the weights (accumulators stay in registers)
constexpr int kTileN = 4;  // weight rows per tile: 4 x 4 accumulators, 4 weight vectors and one of x
constexpr int kAhead = 32768;  // bytes of weights prefetched ahead of the loads (into L2: _MM_HINT_T1)

#define CUMULO_AVX512 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// What the tile needs of a storage type: one 512-bit load, a masked load of the last `left` elements, and the
// multiply-accumulate into 16 fp32 sums. (The fp32 instantiation is compiled under the same target but uses
// AVX-512F only: GCC emits no BF16 instruction for fp32 code, checked in its disassembly. Its path is taken on
// CPUs with AVX-512F and BW, with or without AVX512-BF16.)
struct Bf16Ops {
    using T = uint16_t;
    using V = __m512i;
    static constexpr int kStep = 32;
    CUMULO_AVX512 static inline V load(const T* p) { return _mm512_loadu_si512(p); }
    CUMULO_AVX512 static inline V load_tail(const T* p, int64_t left) {
        return _mm512_maskz_loadu_epi16(left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1u), p);
    }
    CUMULO_AVX512 static inline __m512 dot(__m512 acc, V w, V x) {
        return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
    }
};

struct F32Ops {
    using T = float;
    using V = __m512;
    static constexpr int kStep = 16;
    CUMULO_AVX512 static inline V load(const T* p) { return _mm512_loadu_ps(p); }
    CUMULO_AVX512 static inline V load_tail(const T* p, int64_t left) {
        return _mm512_maskz_loadu_ps(left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u), p);
    }
    CUMULO_AVX512 static inline __m512 dot(__m512 acc, V w, V x) { return _mm512_fmadd_ps(w, x, acc); }
};

// out[i * NR + j] = x row i . w row j, for NR weight rows (stride ws) and MR rows of x (stride xs). A single
// weight row (NR = 1) runs two steps per iteration into two sets of sums, so that one row of x is not held to
// one multiply-accumulate per instruction latency.
template <typename Ops, int NR, int MR>
CUMULO_AVX512 void tile(const typename Ops::T* x, int64_t xs, int64_t K, const typename Ops::T* w, int64_t ws,
                        float* out) {
    using V = typename Ops::V;
    constexpr int U = NR == 1 ? 2 : 1;
    constexpr int64_t step = Ops::kStep;
    __m512 acc[U][MR][NR];
    for (int u = 0; u < U; ++u)
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) acc[u][i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + U * step <= K; k += U * step) {
        for (int u = 0; u < U; ++u) {
            V wv[NR];
            for (int j = 0; j < NR; ++j) {
                // A thread's rows are contiguous: fetch ahead across row ends, where the hardware prefetcher
                // would otherwise stall.
                _mm_prefetch((const char*)(w + j * ws + k + u * step) + kAhead, _MM_HINT_T1);
                wv[j] = Ops::load(w + j * ws + k + u * step);
            }
            for (int i = 0; i < MR; ++i) {
                const V xv = Ops::load(x + i * xs + k + u * step);
                for (int j = 0; j < NR; ++j) acc[u][i][j] = Ops::dot(acc[u][i][j], wv[j], xv);
            }
        }
    }
    for (; k < K; k += step) {  // what is left: whole steps, then a masked one
        V wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = Ops::load_tail(w + j * ws + k, K - k);
        for (int i = 0; i < MR; ++i) {
            const V xv = Ops::load_tail(x + i * xs + k, K - k);
            for (int j = 0; j < NR; ++j) acc[0][i][j] = Ops::dot(acc[0][i][j], wv[j], xv);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            __m512 sum = acc[0][i][j];
            for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][i][j]);
            out[i * NR + j] = _mm512_reduce_add_ps(sum);
        }
}

template <typename Ops, int NR>
void tile_rows(int64_t mb, const typename Ops::T* x, int64_t xs, int64_t K, const typename Ops::T* w, int64_t ws,
               float* out) {
    switch (mb) {
        case 1: tile<Ops, NR, 1>(x, xs, K, w, ws, out); break;
        case 2: tile<Ops, NR, 2>(x, xs, K, w, ws, out); break;
        case 3: tile<Ops, NR, 3>(x, xs, K, w, ws, out); break;
        default: tile<Ops, NR, 4>(x, xs, K, w, ws, out); break;
    }
}

// y [m0 + i, n0 + j] = out[i * nr + j] + bias, as fp32 or rounded to the storage type.
template <typename T>
inline void emit(const float* out, int64_t mb, int64_t nr, int64_t m0, int64_t n0, int64_t N, const T* bias,
                 void* y, bool y_fp32) {
    for (int64_t i = 0; i < mb; ++i)
        for (int64_t j = 0; j < nr; ++j) {
            const float v = out[i * nr + j] + (bias ? cumulo_bf16::load(bias, n0 + j) : 0.0f);
            if (y_fp32) ((float*)y)[(m0 + i) * N + n0 + j] = v;
            else cumulo_bf16::store((T*)y, (m0 + i) * N + n0 + j, v);
        }
}

// Packed weights against a batch: bf16 x [M, K] -> bf16 y [M, N], where decode(n0, nr, w) writes weight rows
// n0 .. n0 + nr - 1 as bf16 into w [nr, K]. Each thread decodes kTileN rows at a time into its own scratch (a
// few KB: it stays in L1) and runs the dense tile over every row of x, so a weight is decoded once per call,
// not once per few rows of x, and the products run at the dense bf16 kernel's speed. The fused row kernels
// decode once per 4-8 rows of x; for a batch of 16 their decoding costs more than the products.
// The result is x times the bf16 dequantization of W (one rounding of value x scale), as the prefill path's
// dequantize + bf16 GEMM; exact where the scales are powers of two (E8M0, UE8M0). `mul` (NVFP4's fp32 tensor
// scale) multiplies the fp32 sums before the one rounding to bf16.
template <typename Decode>
void decode_tiles(const uint16_t* x, int64_t M, int64_t K, int64_t N, const Decode& decode, uint16_t* y,
                  int nthreads, float mul = 1.0f) {
    const int64_t tiles = (N + kTileN - 1) / kTileN;
#pragma omp parallel num_threads(nthreads)
    {
        cumulo_simd::Scratch<uint16_t> w(kTileN * K);
        float out[kRows * kTileN];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t n0 = t * kTileN, nr = N - n0 < kTileN ? N - n0 : kTileN;
            decode(n0, nr, w.data());
            for (int64_t m0 = 0; m0 < M; m0 += kRows) {
                const int64_t mb = M - m0 < kRows ? M - m0 : kRows;
                if (nr == kTileN) {
                    tile_rows<Bf16Ops, kTileN>(mb, x + m0 * K, K, K, w.data(), K, out);
                    if (mul != 1.0f)
                        for (int64_t i = 0; i < mb * kTileN; ++i) out[i] *= mul;
                    emit<uint16_t>(out, mb, kTileN, m0, n0, N, nullptr, y, false);
                    continue;
                }
                for (int64_t j = 0; j < nr; ++j) {
                    tile_rows<Bf16Ops, 1>(mb, x + m0 * K, K, K, w.data() + j * K, K, out);
                    if (mul != 1.0f)
                        for (int64_t i = 0; i < mb; ++i) out[i] *= mul;
                    emit<uint16_t>(out, mb, 1, m0, n0 + j, N, nullptr, y, false);
                }
            }
        }
    }
}

}  // namespace cumulo_tile

// bf16 x times weights that decode, 32 elements at a time, into exact bf16 of value x block scale (NVFP4 in
// fp4.cpp, MXFP6 in fp6.cpp): y = mul * (x W^T), summed in fp32 and rounded once to bf16. Below kDecodeOnceRows
// rows of x the weights are decoded in registers and multiplied at once (vdpbf16ps; for one row, NR weight rows
// per pass share each x load); from it each weight row is decoded once per call into L1 scratch for the dense
// tile (tile.h). Both paths multiply the same bf16 weights, so they give the same product up to the order of
// the fp32 sums. A Dec is a struct with `__m512i operator()(int64_t n, int64_t g)`: row n's elements 32g .. 32g +
// 31 (K % 32 == 0), built under CUMULO_DECODED so that it inlines into the loops below.
#pragma once

#include <omp.h>
#include <stdint.h>

#include "bf16.h"
#include "simd.h"
#include "tile.h"

namespace cumulo_decoded {

#define CUMULO_DECODED __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")))

constexpr int64_t kDecodeOnceRows = 8;  // as fp4.cpp and fp8.cpp: from 8 rows of x, decode once per call
constexpr int kNR = 4;  // weight rows per pass for one row of x
constexpr int kMaxR = 7;  // rows of x per pass below kDecodeOnceRows

// One weight row n against R rows of x (stride K).
template <int R, class Dec>
CUMULO_DECODED void rows_of_x(const uint16_t* x, int64_t K, const Dec& dec, int64_t n, float* out) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 32; ++g) {
        const __m512i w = dec(n, g);
        for (int i = 0; i < R; ++i)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)w, (__m512bh)_mm512_loadu_si512(x + i * K + 32 * g));
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// NR weight rows n0 .. n0 + NR - 1 against one row of x: NR independent chains.
template <int NR, class Dec>
CUMULO_DECODED void rows_of_w(const uint16_t* x, int64_t K, const Dec& dec, int64_t n0, float* out) {
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 32; ++g) {
        const __m512i xv = _mm512_loadu_si512(x + 32 * g);
        for (int r = 0; r < NR; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)dec(n0 + r, g), (__m512bh)xv);
    }
    for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

template <class Dec>
CUMULO_DECODED void decode_row(const Dec& dec, int64_t n, int64_t K, uint16_t* out) {
    for (int64_t g = 0; g < K / 32; ++g) _mm512_storeu_si512(out + 32 * g, dec(n, g));
}

template <class Dec>
void rows_of_x_any(int64_t mb, const uint16_t* x, int64_t K, const Dec& dec, int64_t n, float* out) {
    switch (mb) {
        case 1: rows_of_x<1>(x, K, dec, n, out); break;
        case 2: rows_of_x<2>(x, K, dec, n, out); break;
        case 3: rows_of_x<3>(x, K, dec, n, out); break;
        case 4: rows_of_x<4>(x, K, dec, n, out); break;
        case 5: rows_of_x<5>(x, K, dec, n, out); break;
        case 6: rows_of_x<6>(x, K, dec, n, out); break;
        default: rows_of_x<7>(x, K, dec, n, out); break;
    }
}

// bf16 x [M, K] -> bf16 y [M, N] = mul * x W^T (mul: NVFP4's fp32 tensor scale, 1 for MXFP6). From
// kDecodeOnceRows rows of x the batch path is cumulo_tile::decode_tiles.
template <class Dec>
void linear(const uint16_t* x, int64_t M, int64_t K, int64_t N, const Dec& dec, float mul, uint16_t* y,
            int nthreads) {
    using cumulo_bf16::from_float;
    if (M >= kDecodeOnceRows) {
        const auto decode = [&](int64_t n0, int64_t nr, uint16_t* w) {
            for (int64_t r = 0; r < nr; ++r) decode_row(dec, n0 + r, K, w + r * K);
        };
        cumulo_tile::decode_tiles(x, M, K, N, decode, y, nthreads, mul);
        return;
    }
    if (M == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t g = 0; g < (N + kNR - 1) / kNR; ++g) {
            const int64_t n0 = g * kNR, nr = N - n0 < kNR ? N - n0 : kNR;
            float out[kNR];
            if (nr == kNR) rows_of_w<kNR>(x, K, dec, n0, out);
            else
                for (int64_t r = 0; r < nr; ++r) rows_of_w<1>(x, K, dec, n0 + r, out + r);
            for (int64_t r = 0; r < nr; ++r) y[n0 + r] = from_float(out[r] * mul);
        }
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float out[kMaxR];
        for (int64_t m0 = 0; m0 < M; m0 += kMaxR) {
            const int64_t mb = M - m0 < kMaxR ? M - m0 : kMaxR;
            rows_of_x_any(mb, x + m0 * K, K, dec, n, out);
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = from_float(out[i] * mul);
        }
    }
}

}  // namespace cumulo_decoded

// RMSNorm for CPUs (cumulo.platform.kernels.rms_norm): y = x / sqrt(mean(x^2) + eps) * w, per row.
//
// Why: torch's CPU rms_norm on a single 16-bit decode row is a chain of about ten operators (upcast, pow, mean,
// add, rsqrt, mul, downcast), 30-40 us per call; a decoder step calls it twice per layer. Here it is one pass
// to sum squares and one to scale, in fp32, rounded once to the input's dtype (round to nearest even), as
// torch's fused kernel computes it. x and w are both fp32 or both bf16; rows are contiguous. Plain C ABI.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

namespace {

using cumulo_bf16::load;
using cumulo_bf16::store;

template <typename T>
void norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t dim, float eps, float offset, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * dim;
        T* yr = y + r * dim;
        float part[16] = {0};  // independent partial sums: the compiler vectorises this loop as is
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16)
            for (int j = 0; j < 16; ++j) {
                const float v = load(xr, i + j);
                part[j] += v * v;
            }
        float ss = 0.0f;
        for (; i < dim; ++i) ss += load(xr, i) * load(xr, i);
        for (int j = 0; j < 16; ++j) ss += part[j];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t k = 0; k < dim; ++k) store(yr, k, load(xr, k) * inv * (load(w, k) + offset));
    }
}

// x += r (rounded to x's dtype, as a torch add of the two would be), then y = norm(x): the residual add and the
// next norm of a decoder layer in one pass over each row.
template <typename T>
void add_norm_rows(T* x, const T* r, const T* w, T* y, int64_t rows, int64_t dim, float eps, float offset) {
    for (int64_t i = 0; i < rows * dim; ++i) store(x, i, load(x, i) + load(r, i));
    norm_rows((const T*)x, w, y, rows, dim, eps, offset, 1);
}

inline float float_bits(int64_t v) {
    const uint32_t u = (uint32_t)v;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

}  // namespace

extern "C" {

// The decode-graph forms (cumulo.platform.kernels.graph); eps and offset travel as fp32 bit patterns.
// a = {x, w, y, rows, dim, eps, offset, bf16, threads}
void cumulo_rms_norm_op(const int64_t* a) {
    if (a[7])
        norm_rows((const uint16_t*)a[0], (const uint16_t*)a[1], (uint16_t*)a[2], a[3], a[4], float_bits(a[5]),
                  float_bits(a[6]), (int)a[8]);
    else
        norm_rows((const float*)a[0], (const float*)a[1], (float*)a[2], a[3], a[4], float_bits(a[5]),
                  float_bits(a[6]), (int)a[8]);
}

// a = {x (updated in place), r, w, y, rows, dim, eps, offset, bf16}
void cumulo_add_rms_norm_op(const int64_t* a) {
    if (a[8])
        add_norm_rows((uint16_t*)a[0], (const uint16_t*)a[1], (const uint16_t*)a[2], (uint16_t*)a[3], a[4], a[5],
                      float_bits(a[6]), float_bits(a[7]));
    else
        add_norm_rows((float*)a[0], (const float*)a[1], (const float*)a[2], (float*)a[3], a[4], a[5],
                      float_bits(a[6]), float_bits(a[7]));
}


// bf16 = 1: x, w, y are bf16 (uint16 bit patterns); 0: fp32. offset is added to w (Gemma's 1 + w convention).
void cumulo_rms_norm(const void* x, const void* w, void* y, int64_t rows, int64_t dim, float eps, float offset,
                     int bf16, int nthreads) {
    if (bf16)
        norm_rows((const uint16_t*)x, (const uint16_t*)w, (uint16_t*)y, rows, dim, eps, offset, nthreads);
    else
        norm_rows((const float*)x, (const float*)w, (float*)y, rows, dim, eps, offset, nthreads);
}

}  // extern "C"

// RMSNorm for CPUs (cumulo.platform.kernels.rms_norm): y = x / sqrt(mean(x^2) + eps) * w, per row.
//
// Why: torch's CPU rms_norm on a single 16-bit decode row is a chain of about ten operators (upcast, pow, mean,
// add, rsqrt, mul, downcast), each with its own call cost; a decoder step calls it twice per layer. Here it
// takes one pass to sum squares and one to scale, in fp32, rounded once to the input's dtype (round to nearest
// even), as torch's fused kernel computes it. x and w are both fp32 or both bf16; rows are contiguous. Entry
// points as kernel.h declares them.

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "kernel.h"

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

}  // namespace

// y = norm(x) * (w + offset) over rows of dim; bf16 = 1: x, w, y are bf16 (uint16 bit patterns), 0: fp32.
// offset is added to w (Gemma's 1 + w convention).
#define CUMULO_RMS_NORM(X)                                                                                  \
    X(const void*, x) X(const void*, w) X(void*, y) X(int64_t, rows) X(int64_t, dim) X(float, eps) X(float, offset) \
        X(int, bf16) X(int, threads)
CUMULO_KERNEL(cumulo_rms_norm, CUMULO_RMS_NORM) {
    if (a.bf16)
        norm_rows((const uint16_t*)a.x, (const uint16_t*)a.w, (uint16_t*)a.y, a.rows, a.dim, a.eps, a.offset,
                  a.threads);
    else
        norm_rows((const float*)a.x, (const float*)a.w, (float*)a.y, a.rows, a.dim, a.eps, a.offset, a.threads);
    return 0;
}

// x += r (x updated in place), then y = norm(x) * (w + offset), on the calling thread.
#define CUMULO_ADD_RMS_NORM(X)                                                                           \
    X(void*, x) X(const void*, r) X(const void*, w) X(void*, y) X(int64_t, rows) X(int64_t, dim) X(float, eps) \
        X(float, offset) X(int, bf16)
CUMULO_KERNEL(cumulo_add_rms_norm, CUMULO_ADD_RMS_NORM) {
    if (a.bf16)
        add_norm_rows((uint16_t*)a.x, (const uint16_t*)a.r, (const uint16_t*)a.w, (uint16_t*)a.y, a.rows, a.dim,
                      a.eps, a.offset);
    else
        add_norm_rows((float*)a.x, (const float*)a.r, (const float*)a.w, (float*)a.y, a.rows, a.dim, a.eps,
                      a.offset);
    return 0;
}

// RMSNorm for CPUs (cumulo.platform.kernels.rms_norm): y = x / sqrt(mean(x^2) + eps) * w, per row.
//
// Why: torch's CPU rms_norm on a single 16-bit decode row is a chain of about ten operators (upcast, pow, mean,
// add, rsqrt, mul, downcast), 30-40 us per call; a decoder step calls it twice per layer. Here it is one pass
// to sum squares and one to scale, in fp32, rounded once to the input's dtype (round to nearest even), as
// torch's fused kernel computes it. x and w are both fp32 or both bf16; rows are contiguous. Plain C ABI.

#include <math.h>
#include <stdint.h>

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

}  // namespace

extern "C" {

// bf16 = 1: x, w, y are bf16 (uint16 bit patterns); 0: fp32. offset is added to w (Gemma's 1 + w convention).
void cumulo_rms_norm(const void* x, const void* w, void* y, int64_t rows, int64_t dim, float eps, float offset,
                     int bf16, int nthreads) {
    if (bf16)
        norm_rows((const uint16_t*)x, (const uint16_t*)w, (uint16_t*)y, rows, dim, eps, offset, nthreads);
    else
        norm_rows((const float*)x, (const float*)w, (float*)y, rows, dim, eps, offset, nthreads);
}

}  // extern "C"

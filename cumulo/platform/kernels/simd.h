// Pieces the x86 kernels share (built with -mavx2 -mfma -mf16c): a horizontal sum, aligned scratch, and bf16
// activations in and out of the fp32 kernels.
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

namespace cumulo_simd {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Scratch for rows of x (and of y), 64-byte aligned and zeroed. A 512-bit load from a row that is not aligned
// splits across two cache lines: with x in a std::vector (16-byte aligned by malloc), mxfp8 at 4-16 rows ran
// 1.3-1.4x slower on the calls where malloc's block happened not to be aligned, which varied from call to call.
template <typename T>
class Scratch {
   public:
    Scratch() = default;
    explicit Scratch(size_t n) { resize(n); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() { free(p_); }
    void resize(size_t n) {
        free(p_);
        const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;  // aligned_alloc wants a multiple of the alignment
        p_ = (T*)aligned_alloc(64, bytes ? bytes : 64);
        if (p_) memset(p_, 0, bytes);
    }
    T* data() { return p_; }
    T& operator[](size_t i) { return p_[i]; }

   private:
    T* p_ = nullptr;
};

// bf16 activations in and out of a kernel computing in fp32: x is widened to fp32 once per call and the fp32
// results are rounded once to bf16 (cumulo_bf16::from_float), so the caller needs no conversions.
struct Bf16Io {
    Scratch<float> x32, y32;
    const float* x(const void* xin, int64_t n, bool bf16) {
        if (!bf16) return (const float*)xin;
        x32.resize(n);
        const uint16_t* h = (const uint16_t*)xin;
        for (int64_t i = 0; i < n; ++i) x32[i] = cumulo_bf16::to_float(h[i]);
        return x32.data();
    }
    float* y(void* yout, int64_t n, bool bf16) {
        if (!bf16) return (float*)yout;
        y32.resize(n);
        return y32.data();
    }
    void finish(void* yout, int64_t n, bool bf16) {
        if (!bf16) return;
        uint16_t* h = (uint16_t*)yout;
        for (int64_t i = 0; i < n; ++i) h[i] = cumulo_bf16::from_float(y32[i]);
    }
};

}  // namespace cumulo_simd

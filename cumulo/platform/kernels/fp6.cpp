// MXFP6 (E2M3 or E3M2, one E8M0 scale per 32 codes) with bf16 x on CPUs with AVX512-BF16 + VBMI
// (cumulo.formats.kernels.cpu): y = x W^T through decoded.h, the codes decoded to exact bf16 (elements.h:
// fp6x32_bf16) and scaled by adding the scale's exponent to each nonzero bf16, which is exact while every
// result stays a normal bf16: cumulo_mxfp6_takes says whether a weight's scales allow it (else the table kernel,
// lut.cpp, answers). Other x, and other CPUs, take lut.cpp too.

#include <math.h>
#include <stdint.h>

#include "cpu_features.h"
#include "decoded.h"
#include "elements.h"
#include "kernel.h"

namespace {

using namespace cumulo_elements;

// Row n's elements 32g .. 32g + 31: codes [N, 3K / 4] (four per 24-bit word), E8M0 scales [N, K / 32].
struct Fp6Dec {
    const uint8_t* codes;
    const uint8_t* scales;
    int64_t K;
    Fp6Bf16 table;
    CUMULO_DECODED inline __m512i operator()(int64_t n, int64_t g) const {
        const __m512i w = fp6x32_bf16(codes + n * (3 * K / 4) + 24 * g, table);
        const __m512i shift = _mm512_set1_epi16((short)(((int)scales[n * (K / 32) + g] - 127) * 128));
        return _mm512_mask_add_epi16(w, _mm512_test_epi16_mask(w, _mm512_set1_epi16(0x7FFF)), w, shift);
    }
};

}  // namespace

// Whether every E8M0 code in scales [count] keeps each nonzero value of the element (values: its 64 codes'
// values) times 2^(code - 127) a normal bf16, so that adding the exponent is exact, on a CPU with the kernel.
#define CUMULO_MXFP6_TAKES(X) X(const uint8_t*, scales) X(int64_t, count) X(const float*, values)
CUMULO_KERNEL(cumulo_mxfp6_takes, CUMULO_MXFP6_TAKES) {
    if (!cumulo_cpu::avx512_bf16_vbmi()) return 0;
    float lo = INFINITY, hi = 0.0f;
    for (int c = 0; c < 64; ++c) {
        const float v = fabsf(a.values[c]);
        if (v != 0.0f) lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    int elo = 0, ehi = 0;
    frexpf(lo, &elo);  // lo in [2^(elo - 1), 2^elo)
    frexpf(hi, &ehi);  // hi below 2^ehi
    for (int64_t i = 0; i < a.count; ++i) {
        const int e = (int)a.scales[i] - 127;
        if (a.scales[i] == 255 || elo - 1 + e < -126 || ehi + e > 128) return 0;
    }
    return 1;
}

// bf16 x [M, K] -> bf16 y [M, N], K % 32 == 0, scales the caller checked with cumulo_mxfp6_takes; values: the
// element's 64 values (exact in bf16). Returns 1 (nothing written) without AVX512-BF16 + VBMI or when K % 32.
#define CUMULO_MXFP6_LINEAR_BF16(X)                                                                        \
    X(const void*, x) X(int64_t, M) X(int64_t, K) X(const uint8_t*, codes) X(int64_t, N) X(const uint8_t*, scales) \
        X(const float*, values) X(void*, y) X(int, threads)
CUMULO_KERNEL(cumulo_mxfp6_linear_bf16, CUMULO_MXFP6_LINEAR_BF16) {
    if (!cumulo_cpu::avx512_bf16_vbmi() || a.K % 32) return 1;
    const Fp6Dec dec{a.codes, a.scales, a.K, make_fp6_bf16(a.values)};
    cumulo_decoded::linear((const uint16_t*)a.x, a.M, a.K, a.N, dec, 1.0f, (uint16_t*)a.y, a.threads);
    return 0;
}

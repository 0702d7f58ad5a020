// What this CPU can run: the one run-time probe every kernel source here picks its path with, and that Python
// asks through cumulo_cpu_features (cpu_features.cpp, cumulo.platform.kernels.features).
//
// Bits (features.py names the same ones):
//   kAvx2    AVX2 + FMA + F16C: what the x86 sources are compiled for (-mavx2 -mfma -mf16c)
//   kAvx512  AVX-512 F + BW + VL: the 512-bit fp32 paths
//   kVbmi    AVX512-VBMI: vpermi2b byte tables (the FP8 bf16 kernel)
//   kBf16    AVX512-BF16: vdpbf16ps products and vcvtneps2bf16 rounding
//   kVnni    AVX512-VNNI: vpdpbusd, u8 x s8 -> s32 dot products of 4 (the int8 GEMM)
// Elsewhere than x86 every bit is 0 and the portable sources take their generic paths.
#pragma once

#include <stdint.h>

namespace cumulo_cpu {

enum : int64_t { kAvx2 = 1, kAvx512 = 2, kVbmi = 4, kBf16 = 8, kVnni = 16 };

inline int64_t probe() {
#if defined(__x86_64__) || defined(__i386__)
    int64_t f = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) f |= kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        f |= kAvx512;
    if (__builtin_cpu_supports("avx512vbmi")) f |= kVbmi;
    if (__builtin_cpu_supports("avx512bf16")) f |= kBf16;
    if (__builtin_cpu_supports("avx512vnni")) f |= kVnni;
    return f;
#else
    return 0;
#endif
}

// Whether the CPU has every feature in `want` (probed once per library).
inline bool has(int64_t want) {
    static const int64_t all = probe();
    return (all & want) == want;
}

inline bool avx512() { return has(kAvx512); }
inline bool avx512_bf16() { return has(kAvx512 | kBf16); }
inline bool avx512_bf16_vbmi() { return has(kAvx512 | kBf16 | kVbmi); }

}  // namespace cumulo_cpu

// bf16 <-> fp32 for the CPU kernels of this directory: bf16 is the top half of an fp32, so widening is a shift
// and narrowing rounds to nearest even (NaN kept NaN). Values travel as uint16_t bit patterns.
#pragma once

#include <stdint.h>
#include <string.h>

namespace cumulo_bf16 {

inline float to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Element access for kernels templated on the storage type (float or bf16 bits).
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = from_float(v); }

}  // namespace cumulo_bf16

// Rotary embedding and KV-cache write in one pass (cumulo.platform.kernels.rope_cache), for CPUs.
//
// Input: the fused q/k/v projection of T tokens, [T, (heads + 2 * kv_heads) * dim] with row stride ld. For
// each token at position p: the q heads are rotated into q_out [T, heads, dim]; the k heads are rotated and,
// with the v heads, written to their slot of the paged cache ([kv_heads, slots, dim] per layer, head stride
// cache_hs). Rotation is rotate-half (Hugging Face layout) with fp32 cos/sin tables [positions, dim / 2], in
// fp32 math rounded once to the storage dtype. Replaces about fifteen small torch operators per layer of a
// decode step. fp32 or bf16 (uint16 bits) throughout; the entry point as kernel.h declares it.

#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "kernel.h"

namespace {

using cumulo_bf16::load;
using cumulo_bf16::store;

template <typename T>
inline void rotate(const T* x, const float* c, const float* s, int64_t half, T* out) {
    for (int64_t i = 0; i < half; ++i) {
        const float a = load(x, i), b = load(x, i + half);
        store(out, i, a * c[i] - b * s[i]);
        store(out, i + half, b * c[i] + a * s[i]);
    }
}

template <typename T>
int run(const T* qkv, int64_t T_, int64_t ld_, int64_t heads, int64_t kv_heads, int64_t dim, const int64_t* pos,
        const float* cos, const float* sin, int64_t max_pos, T* kc, T* vc, int64_t cache_hs, int64_t slots,
        const int64_t* slot_mapping, T* q_out) {
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < T_; ++t) {
        const int64_t p = pos[t], slot = slot_mapping[t];
        if (p < 0 || p >= max_pos) return 1;
        if (slot < 0 || slot >= slots) return 2;
        const float* c = cos + p * half;
        const float* s = sin + p * half;
        const T* row = qkv + t * ld_;
        for (int64_t h = 0; h < heads; ++h) rotate(row + h * dim, c, s, half, q_out + (t * heads + h) * dim);
        for (int64_t g = 0; g < kv_heads; ++g) {
            rotate(row + (heads + g) * dim, c, s, half, kc + g * cache_hs + slot * dim);
            memcpy(vc + g * cache_hs + slot * dim, row + (heads + kv_heads + g) * dim, dim * sizeof(T));
        }
    }
    return 0;
}

}  // namespace

// qkv [T, (heads + 2 * kv_heads) * dim] with row stride ld; pos, slot_mapping [T] int64; cos, sin [max_pos, dim / 2]
// fp32; k_cache, v_cache [kv_heads, slots, dim] (head stride cache_hs); q_out [T, heads, dim]; bf16 = 1: bf16
// bits, else fp32. Returns 0, or 1 for a position outside the tables, 2 for a slot outside the cache.
#define CUMULO_ROPE_CACHE(X)                                                                                   \
    X(const void*, qkv) X(int64_t, T) X(int64_t, ld) X(int64_t, heads) X(int64_t, kv_heads) X(int64_t, dim)    \
        X(const int64_t*, pos) X(const float*, cos) X(const float*, sin) X(int64_t, max_pos) X(void*, k_cache) \
            X(void*, v_cache) X(int64_t, cache_hs) X(int64_t, slots) X(const int64_t*, slot_mapping)          \
                X(void*, q_out) X(int, bf16)
CUMULO_KERNEL(cumulo_rope_cache, CUMULO_ROPE_CACHE) {
    if (a.bf16)
        return run((const uint16_t*)a.qkv, a.T, a.ld, a.heads, a.kv_heads, a.dim, a.pos, a.cos, a.sin, a.max_pos,
                   (uint16_t*)a.k_cache, (uint16_t*)a.v_cache, a.cache_hs, a.slots, a.slot_mapping,
                   (uint16_t*)a.q_out);
    return run((const float*)a.qkv, a.T, a.ld, a.heads, a.kv_heads, a.dim, a.pos, a.cos, a.sin, a.max_pos,
               (float*)a.k_cache, (float*)a.v_cache, a.cache_hs, a.slots, a.slot_mapping, (float*)a.q_out);
}

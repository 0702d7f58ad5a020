// Rotary embedding and KV-cache write in one pass (cumulo.platform.kernels.rope_cache), for CPUs.
//
// Input: the fused q/k/v projection of T tokens, [T, (heads + 2 * kv_heads) * dim] with row stride ld. For
// each token at position p: the q heads are rotated into q_out [T, heads, dim]; the k heads are rotated and,
// with the v heads, written to their slot of the paged cache ([kv_heads, slots, dim] per layer, head stride
// cache_hs). Rotation is rotate-half (Hugging Face layout) with fp32 cos/sin tables [positions, dim / 2], in
// fp32 math rounded once to the storage dtype. Replaces about fifteen small torch operators per layer of a
// decode step. fp32 or bf16 (uint16 bits) throughout; plain C ABI.

#include <stdint.h>
#include <string.h>

#include "bf16.h"

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

extern "C" {

// Returns 0, or 1 for a position outside the tables, 2 for a slot outside the cache.
int cumulo_rope_cache(const void* qkv, int64_t T, int64_t ld, int64_t heads, int64_t kv_heads, int64_t dim,
                      const int64_t* pos, const float* cos, const float* sin, int64_t max_pos, void* k_cache,
                      void* v_cache, int64_t cache_hs, int64_t slots, const int64_t* slot_mapping, void* q_out,
                      int bf16) {
    if (bf16)
        return run((const uint16_t*)qkv, T, ld, heads, kv_heads, dim, pos, cos, sin, max_pos, (uint16_t*)k_cache,
                   (uint16_t*)v_cache, cache_hs, slots, slot_mapping, (uint16_t*)q_out);
    return run((const float*)qkv, T, ld, heads, kv_heads, dim, pos, cos, sin, max_pos, (float*)k_cache,
               (float*)v_cache, cache_hs, slots, slot_mapping, (float*)q_out);
}

// The decode-graph form (cumulo.platform.kernels.graph): a holds the 17 arguments above in order, then a
// pointer to an int64 status word that receives a non-zero return code.
void cumulo_rope_cache_op(const int64_t* a) {
    const int code = cumulo_rope_cache((const void*)a[0], a[1], a[2], a[3], a[4], a[5], (const int64_t*)a[6],
                                       (const float*)a[7], (const float*)a[8], a[9], (void*)a[10], (void*)a[11],
                                       a[12], a[13], (const int64_t*)a[14], (void*)a[15], (int)a[16]);
    if (code) *(int64_t*)a[17] = code;
}

}  // extern "C"

// The CPU decode graph (cumulo.platform.kernels.graph): one decode step replayed as a list of kernel calls.
//
// Each op is a kernel's entry point and its int64 argument array (kernel.h), the same call an eager use makes,
// recorded once per batch size over fixed buffers; `cumulo_graph_run` calls them in order, so a step of a
// 30-layer model costs one ctypes call instead of some 300 Python-level calls and as many small torch
// operators. A kernel that fails (a slot or position out of range) returns its code and the run stops there.
// Also the one small operator the graph needs that no other kernel file has: SiLU(gate) * up.

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "kernel.h"

namespace {

using cumulo_bf16::load;
using cumulo_bf16::store;

typedef int64_t (*KernelFn)(const int64_t*);  // every kernel's entry point (kernel.h)

// act = silu(gate) * up over rows of [gate | up], each result rounded to T as torch's two operators round it.
template <typename T>
void silu_mul(const T* gu, T* act, int64_t rows, int64_t inter) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gu + r * 2 * inter;
        const T* u = g + inter;
        T* o = act + r * inter;
        for (int64_t i = 0; i < inter; ++i) {
            const float x = load(g, i);
            T s[1];
            store(s, 0, x / (1.0f + expf(-x)));
            store(o, i, load(s, 0) * load(u, i));
        }
    }
}

}  // namespace

// ops: n pairs (kernel, argument array). Each kernel returns 0 or an error code; the first code stops the run and
// is written to *status. Returns 0, or the failing op's index + 1.
#define CUMULO_GRAPH_RUN(X) X(const int64_t*, ops) X(int64_t, n) X(int64_t*, status)
CUMULO_KERNEL(cumulo_graph_run, CUMULO_GRAPH_RUN) {
    for (int64_t i = 0; i < a.n; ++i) {
        const int64_t code = ((KernelFn)a.ops[2 * i])((const int64_t*)a.ops[2 * i + 1]);
        if (code) {
            *a.status = code;
            return i + 1;
        }
    }
    return 0;
}

// act [rows, inter] = silu(gate) * up, gate_up [rows, 2 * inter]; bf16 = 1: bf16 bits, else fp32.
#define CUMULO_SILU_MUL(X) X(const void*, gate_up) X(void*, act) X(int64_t, rows) X(int64_t, inter) X(int, bf16)
CUMULO_KERNEL(cumulo_silu_mul, CUMULO_SILU_MUL) {
    if (a.bf16) silu_mul((const uint16_t*)a.gate_up, (uint16_t*)a.act, a.rows, a.inter);
    else silu_mul((const float*)a.gate_up, (float*)a.act, a.rows, a.inter);
    return 0;
}

// Multi-LoRA over a decode step's rows (cumulo.engine.lora): y[r] += (x[r] @ A^T) @ Bt for each row r whose
// adapter has a product for this linear. table [rows, 3] int64, refilled every step: (address of A [R, in],
// address of Bt [R, out], R), or (0, 0, 0) for a base row; A and Bt are the adapter's own contiguous tensors, so
// no weight is copied or gathered. The shrink result is rounded to T, as the eager `x @ A^T` in T rounds it;
// the expand accumulates in fp32 and rounds once, as torch's addmm does.
namespace {

constexpr int64_t LORA_CHUNK = 256;  // output columns per accumulator block (1 KiB of fp32, kept in registers/L1)

template <typename T>
void lora_rows(const T* x, T* y, const int64_t* table, int64_t rows, int64_t in, int64_t out, int nthreads) {
    int64_t max_rank = 0, work = 0;
    for (int64_t r = 0; r < rows; ++r) {
        max_rank = table[3 * r + 2] > max_rank ? table[3 * r + 2] : max_rank;
        work += table[3 * r + 2] * (in + out);
    }
    if (!max_rank) return;
    float* t = new float[rows * max_rank];
#pragma omp parallel for num_threads(nthreads) schedule(static) if (work >= 262144)
    for (int64_t r = 0; r < rows; ++r) {
        const T* a = (const T*)table[3 * r];
        const int64_t rank = table[3 * r + 2];
        const T* xr = x + r * in;
        for (int64_t k = 0; k < rank; ++k) {
            const T* ak = a + k * in;
            float part[16] = {0};  // independent partial sums: vectorised as is
            int64_t i = 0;
            for (; i + 16 <= in; i += 16)
                for (int j = 0; j < 16; ++j) part[j] += load(ak, i + j) * load(xr, i + j);
            float s = 0.0f;
            for (; i < in; ++i) s += load(ak, i) * load(xr, i);
            for (int j = 0; j < 16; ++j) s += part[j];
            T rounded[1];
            store(rounded, 0, s);
            t[r * max_rank + k] = load(rounded, 0);
        }
    }
    const int64_t chunks = (out + LORA_CHUNK - 1) / LORA_CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (work >= 262144)
    for (int64_t rc = 0; rc < rows * chunks; ++rc) {
        const int64_t r = rc / chunks, o0 = (rc % chunks) * LORA_CHUNK;
        const int64_t rank = table[3 * r + 2];
        if (!rank) continue;
        const T* bt = (const T*)table[3 * r + 1];
        const int64_t n = out - o0 < LORA_CHUNK ? out - o0 : LORA_CHUNK;
        float acc[LORA_CHUNK] = {0};
        for (int64_t k = 0; k < rank; ++k) {
            const float tk = t[r * max_rank + k];
            const T* bk = bt + k * out + o0;
            for (int64_t j = 0; j < n; ++j) acc[j] += tk * load(bk, j);
        }
        T* yr = y + r * out + o0;
        for (int64_t j = 0; j < n; ++j) store(yr, j, load(yr, j) + acc[j]);
    }
    delete[] t;
}

}  // namespace

// y [rows, out] += per row (x [rows, in] @ A^T) @ Bt, A and Bt as table [rows, 3] names them (above); bf16 = 1:
// x, y and the weights are bf16 bits, else fp32.
#define CUMULO_LORA(X)                                                                                       \
    X(const void*, x) X(void*, y) X(const int64_t*, table) X(int64_t, rows) X(int64_t, in) X(int64_t, out) \
        X(int, bf16) X(int, threads)
CUMULO_KERNEL(cumulo_lora, CUMULO_LORA) {
    if (a.bf16) lora_rows((const uint16_t*)a.x, (uint16_t*)a.y, a.table, a.rows, a.in, a.out, a.threads);
    else lora_rows((const float*)a.x, (float*)a.y, a.table, a.rows, a.in, a.out, a.threads);
    return 0;
}

// Multi-head latent attention, absorbed decode form (cumulo.models.mla.MLAttention._decode), one query per row:
// q_latent = q_nope W_UK per head; scores over the row's cached tokens = (q_latent . latent + q_pe . k_pe) * scale;
// fp32 softmax; o_latent = probs . latents; out = o_latent W_UV^T. Each intermediate is rounded to T where the
// eager einsum/bmm/mul_ rounds it, so fp32 matches to fp32 rounding and bf16 stays close to eager.
namespace {

template <typename T>
int64_t mla_decode(const T* q, const T* w_uk, const T* w_uv, const T* cache, const int64_t* tables,
                   const int64_t* lens, T* out, int64_t batch, int64_t heads, int64_t nope, int64_t rope,
                   int64_t rank, int64_t v_dim, int64_t block_size, int64_t max_blocks, int64_t num_blocks,
                   float scale, int nthreads) {
    const int64_t width = rank + rope, qk = nope + rope;
    for (int64_t b = 0; b < batch; ++b) {
        if (lens[b] < 1 || lens[b] > max_blocks * block_size) return 1;
        for (int64_t j = 0; j < (lens[b] + block_size - 1) / block_size; ++j)
            if (tables[b * max_blocks + j] < 0 || tables[b * max_blocks + j] >= num_blocks) return 2;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
        const int64_t b = bh / heads, h = bh % heads, n = lens[b];
        const T* qn = q + (b * heads + h) * qk;
        const T* qp = qn + nope;
        const T* uk = w_uk + h * nope * rank;
        const T* uv = w_uv + h * v_dim * rank;
        float* ql = new float[rank];
        float* p = new float[n];
        float* ol = new float[rank];
        T s[1];
        // q_latent: each output's sum runs over d in order, the inner loop along a row of W_UK (contiguous over
        // rank) so it vectorizes; a column walk (stride rank) made this op 0.5 ms a layer.
        for (int64_t r = 0; r < rank; ++r) ql[r] = 0.0f;
        for (int64_t d = 0; d < nope; ++d) {
            const float x = load(qn, d);
            const T* w = uk + d * rank;
#pragma omp simd
            for (int64_t r = 0; r < rank; ++r) ql[r] += x * load(w, r);
        }
        for (int64_t r = 0; r < rank; ++r) {
            store(s, 0, ql[r]);
            ql[r] = load(s, 0);
        }
        float top = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
            const T* row = cache + (tables[b * max_blocks + t / block_size] * block_size + t % block_size) * width;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t r = 0; r < rank; ++r) acc += ql[r] * load(row, r);
            for (int64_t d = 0; d < rope; ++d) acc += load(qp, d) * load(row, rank + d);
            store(s, 0, acc);
            store(s, 0, load(s, 0) * scale);
            p[t] = load(s, 0);
            top = p[t] > top ? p[t] : top;
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < n; ++t) sum += (p[t] = expf(p[t] - top));
        for (int64_t t = 0; t < n; ++t) {
            store(s, 0, p[t] / sum);
            p[t] = load(s, 0);
        }
        for (int64_t r = 0; r < rank; ++r) ol[r] = 0.0f;
        for (int64_t t = 0; t < n; ++t) {
            const T* row = cache + (tables[b * max_blocks + t / block_size] * block_size + t % block_size) * width;
            const float pt = p[t];
#pragma omp simd
            for (int64_t r = 0; r < rank; ++r) ol[r] += pt * load(row, r);
        }
        for (int64_t r = 0; r < rank; ++r) {
            store(s, 0, ol[r]);
            ol[r] = load(s, 0);
        }
        T* o = out + (b * heads + h) * v_dim;
        for (int64_t v = 0; v < v_dim; ++v) {
            const T* w = uv + v * rank;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t r = 0; r < rank; ++r) acc += ol[r] * load(w, r);
            store(o, v, acc);
        }
        delete[] ql;
        delete[] p;
        delete[] ol;
    }
    return 0;
}

}  // namespace

// out [batch, heads, v_dim] from q [batch, heads, nope + rope] (q_pe already rotated), w_uk [heads, nope, rank],
// w_uv [heads, v_dim, rank], cache [num_blocks, block_size, rank + rope], tables [batch, max_blocks] int64 and
// lens [batch] int64; bf16 = 1: bf16 bits, else fp32. Returns 1 for a length out of range, 2 for a block id.
#define CUMULO_MLA_DECODE(X)                                                                                    \
    X(const void*, q) X(const void*, w_uk) X(const void*, w_uv) X(const void*, cache) X(const int64_t*, tables) \
        X(const int64_t*, lens) X(void*, out) X(int64_t, batch) X(int64_t, heads) X(int64_t, nope)              \
            X(int64_t, rope) X(int64_t, rank) X(int64_t, v_dim) X(int64_t, block_size) X(int64_t, max_blocks)   \
                X(int64_t, num_blocks) X(float, scale) X(int, bf16) X(int, threads)
CUMULO_KERNEL(cumulo_mla_decode, CUMULO_MLA_DECODE) {
    if (a.bf16)
        return mla_decode((const uint16_t*)a.q, (const uint16_t*)a.w_uk, (const uint16_t*)a.w_uv,
                          (const uint16_t*)a.cache, a.tables, a.lens, (uint16_t*)a.out, a.batch, a.heads, a.nope,
                          a.rope, a.rank, a.v_dim, a.block_size, a.max_blocks, a.num_blocks, a.scale, a.threads);
    return mla_decode((const float*)a.q, (const float*)a.w_uk, (const float*)a.w_uv, (const float*)a.cache,
                      a.tables, a.lens, (float*)a.out, a.batch, a.heads, a.nope, a.rope, a.rank, a.v_dim,
                      a.block_size, a.max_blocks, a.num_blocks, a.scale, a.threads);
}

// Multi-head latent attention's per-step writes (cumulo.models.mla.MLAttention.forward): each row's q_pe rotated in
// place in q [batch, heads, nope + rope]; its kv_a_proj output kv [batch, rank + rope] split into the latent,
// RMS-normalised with kv_a_layernorm (fp32, rounded once, as the rms_norm kernel does), and k_pe, rotated; both
// written to the row's cache slot [rank + rope]. Rotary as RotaryEmbedding: cos/sin fp32 tables [positions,
// rope / 2] rounded to T, each product and sum rounded to T, pairs (i, i + rope / 2) or interleaved (2i, 2i + 1),
// the rotated halves side by side.
namespace {

template <typename T>
void rotate(T* x, const float* cos, const float* sin, int64_t rope, int interleaved) {
    const int64_t half = rope / 2;
    float tmp[512];  // rope <= 1024 (checked by the caller)
    T s[1];
    auto r = [&s](float v) {
        store(s, 0, v);
        return load(s, 0);
    };
    for (int64_t i = 0; i < half; ++i) {
        const float x1 = load(x, interleaved ? 2 * i : i), x2 = load(x, interleaved ? 2 * i + 1 : i + half);
        const float c = r(cos[i]), sn = r(sin[i]);
        tmp[i] = r(r(x1 * c) - r(x2 * sn));
        tmp[half + i] = r(r(x2 * c) + r(x1 * sn));
    }
    for (int64_t i = 0; i < rope; ++i) store(x, i, tmp[i]);
}

template <typename T>
int64_t mla_rope_cache(T* q, const T* kv, const T* w, float eps, const int64_t* positions, const float* cos,
                       const float* sin, int64_t max_positions, T* cache, const int64_t* slots, int64_t num_slots,
                       int64_t batch, int64_t heads, int64_t nope, int64_t rope, int64_t rank, int interleaved) {
    const int64_t half = rope / 2;
    for (int64_t b = 0; b < batch; ++b) {
        if (positions[b] < 0 || positions[b] >= max_positions) return 1;
        if (slots[b] < 0 || slots[b] >= num_slots) return 2;
    }
    for (int64_t b = 0; b < batch; ++b) {
        const float* c = cos + positions[b] * half;
        const float* sn = sin + positions[b] * half;
        for (int64_t h = 0; h < heads; ++h) rotate(q + (b * heads + h) * (nope + rope) + nope, c, sn, rope, interleaved);
        const T* row = kv + b * (rank + rope);
        T* slot = cache + slots[b] * (rank + rope);
        float ss = 0.0f;
        for (int64_t k = 0; k < rank; ++k) ss += load(row, k) * load(row, k);
        const float inv = 1.0f / sqrtf(ss / (float)rank + eps);
        for (int64_t k = 0; k < rank; ++k) store(slot, k, load(row, k) * inv * load(w, k));
        for (int64_t k = 0; k < rope; ++k) slot[rank + k] = row[rank + k];
        rotate(slot + rank, c, sn, rope, interleaved);
    }
    return 0;
}

}  // namespace

// See above. cache [slots, rank + rope]; positions and slots [batch] int64; bf16 = 1: q, kv, w and the cache are
// bf16 bits, else fp32. Returns 1 for a position past the tables, 2 for a slot out of range.
#define CUMULO_MLA_ROPE_CACHE(X)                                                                                \
    X(void*, q) X(const void*, kv) X(const void*, w) X(float, eps) X(const int64_t*, positions)               \
        X(const float*, cos) X(const float*, sin) X(int64_t, max_positions) X(void*, cache)                     \
            X(const int64_t*, slots) X(int64_t, num_slots) X(int64_t, batch) X(int64_t, heads) X(int64_t, nope) \
                X(int64_t, rope) X(int64_t, rank) X(int, interleaved) X(int, bf16)
CUMULO_KERNEL(cumulo_mla_rope_cache, CUMULO_MLA_ROPE_CACHE) {
    if (a.rope > 1024 || a.rope % 2) return 3;
    if (a.bf16)
        return mla_rope_cache((uint16_t*)a.q, (const uint16_t*)a.kv, (const uint16_t*)a.w, a.eps, a.positions, a.cos,
                              a.sin, a.max_positions, (uint16_t*)a.cache, a.slots, a.num_slots, a.batch, a.heads,
                              a.nope, a.rope, a.rank, a.interleaved);
    return mla_rope_cache((float*)a.q, (const float*)a.kv, (const float*)a.w, a.eps, a.positions, a.cos, a.sin,
                          a.max_positions, (float*)a.cache, a.slots, a.num_slots, a.batch, a.heads, a.nope, a.rope,
                          a.rank, a.interleaved);
}

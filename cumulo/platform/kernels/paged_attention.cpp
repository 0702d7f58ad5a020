// Fused paged decode attention for CPUs (cumulo.platform.kernels.paged_attention).
//
// One query token per sequence attends to its cached keys 0..len-1 (or the last `window` of them), reading each
// K/V block straight from the paged cache [kv_heads, num_blocks, block_size, head_dim] through the block table:
// no gather copy, no score matrix, no mask tensor. The queries of one kv head (its GQA group) share every K/V
// row read. Softmax is online (flash-decoding): keys are scored a tile at a time, the running max and sum are
// rescaled when the max grows, all in fp32 whatever the cache dtype (fp32 or bf16).
//
// Work units are (sequence, kv head, query chunk, context split), run with OpenMP (the libgomp torch has
// loaded, so one thread pool serves both). When there are fewer units than threads can share evenly (batch 1),
// the context is split and the partial (max, sum, weighted values) are merged at the end.
//
// Vectors are GCC/Clang vector extensions of 8 floats: with -mavx2 -mfma they become AVX2 FMAs, without they
// lower to whatever the target has (SSE pairs, NEON), so one source builds everywhere.
// The entry point as kernel.h declares it (called through ctypes, eagerly or from a decode graph).

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "bf16.h"
#include "kernel.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

// The kernel's arguments (pointers as integers; strides in elements): q and its batch and head strides (head_dim
// contiguous); the caches and their strides of kv head, block and token; the block tables [batch, max_blocks]
// with their row stride; context lengths [batch]; out, contiguous [batch, heads, head_dim]; the shape; window
// (0 = none); bf16 (0/1); threads; the fewest (query, key) pairs worth a thread (0 = always use all threads);
// the softmax scale.
#define CUMULO_PAGED_DECODE_ATTENTION(X)                                                                         \
    X(const void*, q) X(int64_t, q_sb) X(int64_t, q_sh) X(const void*, k) X(const void*, v) X(int64_t, k_sh)     \
        X(int64_t, k_sb) X(int64_t, k_st) X(int64_t, v_sh) X(int64_t, v_sb) X(int64_t, v_st)                     \
            X(const int64_t*, tables) X(int64_t, t_sb) X(int64_t, max_blocks) X(const int64_t*, lens) X(void*, out) \
                X(int64_t, batch) X(int64_t, heads) X(int64_t, kv_heads) X(int64_t, dim) X(int64_t, num_blocks)   \
                    X(int64_t, block_size) X(int64_t, window) X(int, bf16) X(int, threads) X(int64_t, min_pairs) \
                        X(float, scale)
CUMULO_KERNEL_ARGS(cumulo_paged_decode_attention, CUMULO_PAGED_DECODE_ATTENTION)

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

constexpr int kTile = 16;     // keys scored per online-softmax step
constexpr int kMaxQ = 4;      // queries of one kv head per pass over its keys (accumulators stay in registers)
constexpr int kMaxDim = 512;  // head_dim bound for the on-stack query and accumulator rows
constexpr int kMaxSplits = 64;

// One-vector lane permutation: Clang and GCC 12+ spell it __builtin_shufflevector, older GCC __builtin_shuffle.
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, ...) __builtin_shufflevector(a, a, __VA_ARGS__)
#else
#define SHUFFLE(a, ...) __builtin_shuffle(a, v8i{__VA_ARGS__})
#endif

inline v8f load8(const float* p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

// bf16 is the top half of an fp32: widen to 32 bits and shift into place. GCC lowers the generic form to six
// instructions; AVX2 has a one-instruction widening load.
inline v8f load8(const uint16_t* p) {
#ifdef __AVX2__
    return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
#else
    v8h h;
    memcpy(&h, p, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u) << 16);
#endif
}

inline void store8(float* p, v8f v) { memcpy(p, &v, sizeof v); }

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
    for (int64_t i = 0; i < n; i += 64 / sizeof(T)) __builtin_prefetch(p + i);
}

inline float hsum(v8f a) {
    a += SHUFFLE(a, 4, 5, 6, 7, 0, 1, 2, 3);
    a += SHUFFLE(a, 2, 3, 0, 1, 6, 7, 4, 5);
    a += SHUFFLE(a, 1, 0, 3, 2, 5, 4, 7, 6);
    return a[0];
}

inline float hmax(v8f a) {
    v8f b = SHUFFLE(a, 4, 5, 6, 7, 0, 1, 2, 3);
    a = a > b ? a : b;
    b = SHUFFLE(a, 2, 3, 0, 1, 6, 7, 4, 5);
    a = a > b ? a : b;
    b = SHUFFLE(a, 1, 0, 3, 2, 5, 4, 7, 6);
    a = a > b ? a : b;
    return a[0];
}

// exp(x) for x <= 0, to about 2 ulp: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for exp(r), and 2^n
// added to the exponent bits. Inputs below -87 clamp there (exp is < 2e-38, negligible next to the max's 1),
// which keeps 2^n a normal number.
inline v8f exp8(v8f x) {
    const v8f lo = v8f{} - 87.0f;
    x = x < lo ? lo : x;
    const v8f magic = v8f{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
    const v8f t = x * 1.44269504088896341f + magic;
    const v8f n = t - magic;
    v8f r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v8f p = v8f{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i e = ((v8i)t - 0x4B400000) << 23;
    return (v8f)((v8i)p + e);
}

using cumulo_bf16::load;
using cumulo_bf16::store;

using Args = cumulo_paged_decode_attention_args;

// acc[g][0 .. 8 CW) += sum over the tile's keys t of p[g][t] * v[t][0 .. 8 CW).
template <typename T, int NQ, int CW>
inline void accumulate_v(const float (*p)[kTile], int n, const T* v, int64_t v_st, float* acc, int64_t D) {
    v8f sum[NQ][CW];
    for (int g = 0; g < NQ; ++g)
        for (int w = 0; w < CW; ++w) sum[g][w] = load8(acc + g * D + 8 * w);
    for (int t = 0; t < n; ++t) {
        const T* row = v + t * v_st;
        for (int w = 0; w < CW; ++w) {
            const v8f vv = load8(row + 8 * w);
            for (int g = 0; g < NQ; ++g) sum[g][w] += p[g][t] * vv;
        }
    }
    for (int g = 0; g < NQ; ++g)
        for (int w = 0; w < CW; ++w) store8(acc + g * D + 8 * w, sum[g][w]);
}

// Online softmax over positions [p0, p1) of one sequence for NQ queries of one kv head. On return m holds the
// max score, l the sum of exp(score - m) and acc the exp-weighted sum of V rows (not yet divided by l).
// Returns false if the block table points outside the cache.
template <typename T, int NQ>
bool attend(const Args& a, const float* qf, const T* kh, const T* vh, const int64_t* table, int64_t p0,
            int64_t p1, float* m, float* l, float* acc) {
    const int64_t D = a.dim, bs = a.block_size;
    for (int g = 0; g < NQ; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    std::fill(acc, acc + NQ * D, 0.0f);
    alignas(32) float s[NQ][kTile];
    for (int64_t pos = p0; pos < p1;) {
        const int64_t blk = pos / bs, off = pos - blk * bs;
        const int n = (int)std::min({p1 - pos, bs - off, (int64_t)kTile});
        const int64_t phys = table[blk];
        if (phys < 0 || phys >= a.num_blocks) return false;
        const T* kp = kh + phys * a.k_sb + off * a.k_st;
        const T* vp = vh + phys * a.v_sb + off * a.v_st;
        // The next tile is usually in another block somewhere else in memory, out of the hardware prefetcher's
        // sight: ask for its rows now, one per key scored here, so they arrive while this tile computes.
        const T* next_k = nullptr;
        const T* next_v = nullptr;
        int next_n = 0;
        if (pos + n < p1) {
            const int64_t nb = (pos + n) / bs, noff = pos + n - nb * bs, nphys = table[nb];
            if (nphys >= 0 && nphys < a.num_blocks) {
                next_k = kh + nphys * a.k_sb + noff * a.k_st;
                next_v = vh + nphys * a.v_sb + noff * a.v_st;
                next_n = (int)std::min({p1 - pos - n, bs - noff, (int64_t)kTile});
            }
        }

        for (int t = 0; t < n; ++t) {
            const T* kr = kp + t * a.k_st;
            if (t < next_n) {
                prefetch_row(next_k + t * a.k_st, D);
                prefetch_row(next_v + t * a.v_st, D);
            }
            v8f dot[NQ] = {};
            for (int64_t c = 0; c < D; c += 8) {
                const v8f kv = load8(kr + c);
                for (int g = 0; g < NQ; ++g) dot[g] += load8(qf + g * D + c) * kv;
            }
            for (int g = 0; g < NQ; ++g) s[g][t] = hsum(dot[g]);
        }
        for (int g = 0; g < NQ; ++g) {
            for (int t = n; t < kTile; ++t) s[g][t] = -INFINITY;
            const v8f s0 = load8(s[g]), s1 = load8(s[g] + 8);
            const float top = std::max(m[g], hmax(s0 > s1 ? s0 : s1));
            // A first tile has nothing to rescale; later ones only when the max grew.
            const float corr = m[g] == -INFINITY ? 0.0f : expf(m[g] - top);
            v8f e0 = exp8(s0 - top), e1 = exp8(s1 - top);
            store8(s[g], e0);
            store8(s[g] + 8, e1);
            for (int t = n; t < kTile; ++t) s[g][t] = 0.0f;  // padding clamped to exp(-87), not 0
            l[g] = l[g] * corr + hsum(load8(s[g]) + load8(s[g] + 8));
            if (corr != 1.0f) {
                float* ag = acc + g * D;
                for (int64_t c = 0; c < D; c += 8) store8(ag + c, load8(ag + c) * corr);
            }
            m[g] = top;
        }
        // Weighted V rows into the accumulators, CW vectors of head_dim per pass so they stay in registers.
        constexpr int CW = NQ == 1 ? 8 : NQ == 2 ? 4 : NQ == 3 ? 4 : 2;
        int64_t c = 0;
        for (; c + 8 * CW <= D; c += 8 * CW) accumulate_v<T, NQ, CW>(s, n, vp + c, a.v_st, acc + c, D);
        for (; c < D; c += 8) accumulate_v<T, NQ, 1>(s, n, vp + c, a.v_st, acc + c, D);
        pos += n;
    }
    return true;
}

template <typename T>
int run(const Args& a, int threads) {
    const int64_t group = a.heads / a.kv_heads;
    const int64_t chunks = (group + kMaxQ - 1) / kMaxQ;
    const int64_t base_units = a.batch * a.kv_heads * chunks;
    int64_t longest = 0, keys = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
        longest = std::max(longest, a.lens[b]);
        keys += a.window > 0 ? std::min(a.lens[b], a.window) : a.lens[b];
    }
    if (longest > a.max_blocks * a.block_size) return 2;
    // Waking the thread pool costs microseconds: a thread must have enough (query, key) pairs to pay for it.
    if (a.min_pairs > 0)
        threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, keys * a.heads / a.min_pairs));
    // Split the context when the units are too few to keep every thread busy; a split keeps >= 4 blocks so
    // the merge stays cheap next to the work.
    int64_t splits = 1;
    if (threads > 1 && base_units < 4 * threads) {
        const int64_t want = (4 * threads + base_units - 1) / base_units;
        const int64_t most = std::max<int64_t>(1, (longest + 4 * a.block_size - 1) / (4 * a.block_size));
        splits = std::min({want, most, (int64_t)kMaxSplits});
    }
    const int64_t units = base_units * splits;
    const int64_t D = a.dim;
    // Partial results per unit (splits > 1 only): m, l per query, then acc [kMaxQ, D].
    const int64_t part = 2 * kMaxQ + kMaxQ * D;
    std::vector<float> parts(splits > 1 ? units * part : 0);
    const T* q = (const T*)a.q;
    T* out = (T*)a.out;
    int error = 0;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && units > 1)
    for (int64_t u = 0; u < units; ++u) {
        const int64_t split = u % splits, rest = u / splits;
        const int64_t chunk = rest % chunks, bh = rest / chunks;
        const int64_t b = bh / a.kv_heads, kvh = bh % a.kv_heads;
        const int64_t g0 = chunk * kMaxQ, nq = std::min<int64_t>(kMaxQ, group - g0);
        const int64_t h0 = kvh * group + g0;
        const int64_t len = a.lens[b];
        const int64_t start = a.window > 0 ? std::max<int64_t>(0, len - a.window) : 0;
        // This split's share of the sequence's blocks (whole blocks, so tiles never straddle two).
        int64_t p0 = start, p1 = len;
        if (splits > 1 && len > 0) {
            const int64_t first = start / a.block_size, last = (len - 1) / a.block_size;
            const int64_t per = (last - first + splits) / splits;
            p0 = std::max(start, (first + split * per) * a.block_size);
            p1 = std::min(len, (first + (split + 1) * per) * a.block_size);
        }
        alignas(32) float qf[kMaxQ * kMaxDim];
        alignas(32) float acc[kMaxQ * kMaxDim];
        float m[kMaxQ], l[kMaxQ];
        for (int64_t g = 0; g < nq; ++g) {
            const T* qr = q + b * a.q_sb + (h0 + g) * a.q_sh;
            for (int64_t c = 0; c < D; ++c) qf[g * D + c] = load(qr, c) * a.scale;
        }
        const T* kh = (const T*)a.k + kvh * a.k_sh;
        const T* vh = (const T*)a.v + kvh * a.v_sh;
        const int64_t* table = a.tables + b * a.t_sb;
        bool ok = true;
        switch (nq) {
            case 1: ok = attend<T, 1>(a, qf, kh, vh, table, p0, p1, m, l, acc); break;
            case 2: ok = attend<T, 2>(a, qf, kh, vh, table, p0, p1, m, l, acc); break;
            case 3: ok = attend<T, 3>(a, qf, kh, vh, table, p0, p1, m, l, acc); break;
            default: ok = attend<T, 4>(a, qf, kh, vh, table, p0, p1, m, l, acc); break;
        }
        if (!ok) {
#pragma omp atomic write
            error = 1;
        }
        if (splits > 1) {
            float* pp = parts.data() + u * part;
            std::copy(m, m + nq, pp);
            std::copy(l, l + nq, pp + kMaxQ);
            std::copy(acc, acc + nq * D, pp + 2 * kMaxQ);
            continue;
        }
        for (int64_t g = 0; g < nq; ++g) {
            const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
            T* o = out + (b * a.heads + h0 + g) * D;
            for (int64_t c = 0; c < D; ++c) store(o, c, acc[g * D + c] * inv);
        }
    }
    if (splits > 1) {
        // Merge: rescale each split's sums to the overall max, add, divide once.
        for (int64_t r = 0; r < base_units; ++r) {
            const int64_t chunk = r % chunks, bh = r / chunks;
            const int64_t b = bh / a.kv_heads, kvh = bh % a.kv_heads;
            const int64_t g0 = chunk * kMaxQ, nq = std::min<int64_t>(kMaxQ, group - g0);
            const float* first = parts.data() + r * splits * part;
            for (int64_t g = 0; g < nq; ++g) {
                float top = -INFINITY, total = 0.0f;
                for (int64_t s = 0; s < splits; ++s) top = std::max(top, first[s * part + g]);
                float w[kMaxSplits];
                for (int64_t s = 0; s < splits; ++s) {
                    const float ms = first[s * part + g];
                    w[s] = ms == -INFINITY ? 0.0f : expf(ms - top);
                    total += w[s] * first[s * part + kMaxQ + g];
                }
                const float inv = total > 0.0f ? 1.0f / total : 0.0f;
                T* o = out + (b * a.heads + kvh * group + g0 + g) * D;
                for (int64_t c = 0; c < D; ++c) {
                    float x = 0.0f;
                    for (int64_t s = 0; s < splits; ++s) x += w[s] * first[s * part + 2 * kMaxQ + g * D + c];
                    store(o, c, x * inv);
                }
            }
        }
    }
    return error;
}

}  // namespace

// Returns 0 on success, 1 if a block table entry is outside the cache, 2 if a context is longer than its table,
// 3 for shapes the kernel does not take (head_dim not a multiple of 8 or above 512, heads not a multiple of
// kv_heads).
CUMULO_KERNEL_ENTRY(cumulo_paged_decode_attention, CUMULO_PAGED_DECODE_ATTENTION) {
    if (a.dim % 8 || a.dim > kMaxDim || a.kv_heads < 1 || a.heads % a.kv_heads || a.block_size < 1) return 3;
    if (a.batch == 0) return 0;
    const int threads = a.threads > 1 ? a.threads : 1;
    return a.bf16 ? run<uint16_t>(a, threads) : run<float>(a, threads);
}

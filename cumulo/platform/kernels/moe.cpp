// A mixture-of-experts layer's routed experts in one call (cumulo.formats.kernels.moe): for T rows of x, each
// with k selected experts and their weights, y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),
// e = ids[t, j]. Only the selected experts' weights are read, each once per call: slots (t, j) are grouped by
// expert first, and every weight row is multiplied with all the rows routed to its expert.
//
// Why one call: the Python path costs three module calls per selected expert and a handful of torch operators
// per layer, each a parallel region and a ctypes binding (docs/benchmarks.md, MoE section); here one parallel
// region runs three work-shared loops (gate/up + SiLU, down, the weighted sum) with a barrier between them.
//
// Weights: one pointer per expert to its gate_up [2I, H] (gate rows first, as GatedMLP fuses them) and down
// [H, I] matrices: E4M3 codes with block scales (fp32 or E8M0, one table per expert; kind 0), or bf16 (kind 1)
// or fp32 (kind 2) values. Activations x and y are bf16 (bf16 = 1) or fp32; with bf16 the results are rounded
// where the reference rounds them (gate and up outputs, SiLU, its product with up, the down output, its product
// with the weight, the sum), so the two agree to the summation order of a dot product.
// Dot products: fp8 with bf16 x on AVX512-BF16 + VBMI through the byte tables of elements.h (blocks spanning
// whole 64-code chunks); bf16 weights with bf16 x through vdpbf16ps; everything else in fp32 with AVX2.

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "bf16.h"
#include "cpu_features.h"
#include "elements.h"
#include "kernel.h"
#include "simd.h"

namespace {

using namespace cumulo_elements;
using cumulo_bf16::from_float;
using cumulo_bf16::to_float;
using cumulo_simd::hsum;
using cumulo_simd::Scratch;

enum Kind { FP8 = 0, BF16 = 1, FP32 = 2 };
enum Path { TABLE = 0, DOT_BF16 = 1, F32 = 2 };  // how a projection's input rows are laid out and multiplied
constexpr int MB = 4;                            // input rows per pass over a weight row
// fp8 weight bytes read ahead of the one being decoded (into the next rows of the same matrix): on an Intel Xeon
// (AVX-512, AMX) the one-row kernel read cold experts at 7.0 GB/s without it and 11.1 with it, about its rate
// from cache (11.6), so memory and decode stopped taking turns; on Zen 4 it changed nothing (docs/benchmarks.md)
constexpr int64_t PREFETCH = 4096;

struct Scales {
    const float* f32;
    const uint8_t* e8m0;
    int64_t cols;
    inline float at(int64_t rb, int64_t kb) const {
        return f32 ? f32[rb * cols + kb] : e8m0_value(e8m0[rb * cols + kb]);
    }
};

// One projection (gate_up or down) of every expert: [N, K] per expert, and how its inputs are laid out.
struct Proj {
    const int64_t* w;       // per expert: address of codes / values
    const int64_t* scales;  // per expert: address of the block scales (fp8)
    int64_t N, K, bn, bk;
    int kind;
    bool e8m0;
    Path path;
    int64_t stride;  // elements per input row
    Scales scales_of(int64_t e) const {
        const int64_t cols = (K + bk - 1) / bk;
        if (e8m0) return {nullptr, (const uint8_t*)(intptr_t)scales[e], cols};
        return {(const float*)(intptr_t)scales[e], nullptr, cols};
    }
};

// Where element `col` of an input row lives: TABLE rows are permuted into the lane order table8_bf16_64 gives
// the weights (within 64-element chunks: 8 of each 16 to the low half, the other 8 to the high half).
inline int64_t position(Path path, int64_t col) {
    if (path != TABLE) return col;
    const int64_t c = col / 64, r = col % 64, l = r / 16, q = r % 16;
    return c * 64 + (q < 8 ? 8 * l + q : 32 + 8 * l + q - 8);
}

inline void put(void* rows, Path path, int64_t stride, int64_t row, int64_t col, float v) {
    if (path == F32) ((float*)rows)[row * stride + col] = v;
    else ((uint16_t*)rows)[row * stride + position(path, col)] = from_float(v);
}

#define CUMULO_MOE_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")))

// fp8 weight row against R permuted bf16 rows; blocks span whole 64-code chunks or all of K.
template <int R>
CUMULO_MOE_BF16 void dot_table(const uint16_t* const* xs, int64_t K, const uint8_t* row, const Scales& sc,
                               int64_t rb, int64_t bk, const Table8Bf16& t, float* out) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        __m512 b0[R], b1[R];
        for (int i = 0; i < R; ++i) b0[i] = b1[i] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 64) {
            const int64_t left = k1 - k;
            _mm_prefetch((const char*)row + k + PREFETCH, _MM_HINT_T0);
            const __m512i s = left >= 64 ? _mm512_loadu_si512(row + k)
                                         : _mm512_maskz_loadu_epi8((((__mmask64)1 << left) - 1), row + k);
            __m512i w0, w1;
            table8_bf16_64(s, t, w0, w1);
            for (int i = 0; i < R; ++i) {
                b0[i] = _mm512_dpbf16_ps(b0[i], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xs[i] + k));
                b1[i] = _mm512_dpbf16_ps(b1[i], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xs[i] + k + 32));
            }
        }
        const __m512 scale = _mm512_set1_ps(sc.at(rb, kb));
        for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_add_ps(b0[i], b1[i]), scale, acc[i]);
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// NW fp8 weight rows (each with its own scale row rbs[i]) against ONE permuted bf16 row, in one pass over x: each
// row's sum is formed exactly as dot_table<1> forms it (two chains per block, scaled per block).
template <int NW>
CUMULO_MOE_BF16 void dot_table_rows(const uint16_t* x, int64_t K, const uint8_t* const* rows, const Scales& sc,
                                    const int64_t* rbs, int64_t bk, const Table8Bf16& t, float* out) {
    __m512 acc[NW];
    for (int i = 0; i < NW; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        __m512 b0[NW], b1[NW];
        for (int i = 0; i < NW; ++i) b0[i] = b1[i] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 64) {
            const int64_t left = k1 - k;
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k), x1 = (__m512bh)_mm512_loadu_si512(x + k + 32);
            for (int i = 0; i < NW; ++i) {
                _mm_prefetch((const char*)rows[i] + k + PREFETCH, _MM_HINT_T0);
                const __m512i c = left >= 64 ? _mm512_loadu_si512(rows[i] + k)
                                             : _mm512_maskz_loadu_epi8((((__mmask64)1 << left) - 1), rows[i] + k);
                __m512i w0, w1;
                table8_bf16_64(c, t, w0, w1);
                b0[i] = _mm512_dpbf16_ps(b0[i], (__m512bh)w0, x0);
                b1[i] = _mm512_dpbf16_ps(b1[i], (__m512bh)w1, x1);
            }
        }
        for (int i = 0; i < NW; ++i)
            acc[i] = _mm512_fmadd_ps(_mm512_add_ps(b0[i], b1[i]), _mm512_set1_ps(sc.at(rbs[i], kb)), acc[i]);
    }
    for (int i = 0; i < NW; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// bf16 weight row against R bf16 rows (zero-padded to whole 32s), 32 products per instruction.
template <int R>
CUMULO_MOE_BF16 void dot_bf16(const uint16_t* const* xs, int64_t K, const uint16_t* row, float* out) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 m = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1u);
        const __m512i w = _mm512_maskz_loadu_epi16(m, row + k);
        for (int i = 0; i < R; ++i)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)w, (__m512bh)_mm512_maskz_loadu_epi16(m, xs[i] + k));
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// Any weight kind against R fp32 rows, with AVX2 (fp8 scaled per weight as it is decoded, as fp8.cpp does).
template <int R>
void dot_f32(const float* const* xs, int64_t K, const void* w, int kind, const Scales& sc, int64_t rb, int64_t bk,
             float* out) {
    __m256 acc[R];
    float tail[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps(), tail[i] = 0.0f;
    const int64_t step = kind == FP8 ? bk : K;
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += step, ++kb) {
        const int64_t k1 = k0 + step < K ? k0 + step : K;
        const float s = kind == FP8 ? sc.at(rb, kb) : 1.0f;
        const E4M3Scale sv(s);
        int64_t k = k0;
        for (; k + 8 <= k1; k += 8) {
            __m256 wv;
            if (kind == FP8) wv = sv.apply(e4m3x8_f32((const uint8_t*)w + k));
            else if (kind == BF16)
                wv = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)w + k))), 16));
            else wv = _mm256_loadu_ps((const float*)w + k);
            for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[i] + k), acc[i]);
        }
        for (; k < k1; ++k) {
            const float wv = kind == FP8    ? e4m3_value(((const uint8_t*)w)[k]) * s
                             : kind == BF16 ? to_float(((const uint16_t*)w)[k])
                                            : ((const float*)w)[k];
            for (int i = 0; i < R; ++i) tail[i] += wv * xs[i][k];
        }
    }
    for (int i = 0; i < R; ++i) out[i] = hsum(acc[i]) + tail[i];
}

// Weight row n of expert e against the R input rows at xs (in p's layout).
template <int R>
void dots(const Proj& p, int64_t e, int64_t n, const void* const* xs, const Table8Bf16& t, float* out) {
    const void* w = (const void*)(intptr_t)p.w[e];
    const int64_t elem = p.kind == FP8 ? 1 : p.kind == BF16 ? 2 : 4;
    const void* row = (const char*)w + n * p.K * elem;
    const Scales sc = p.kind == FP8 ? p.scales_of(e) : Scales{nullptr, nullptr, 1};
    if (p.path == TABLE) dot_table<R>((const uint16_t* const*)xs, p.K, (const uint8_t*)row, sc, n / p.bn, p.bk, t, out);
    else if (p.path == DOT_BF16) dot_bf16<R>((const uint16_t* const*)xs, p.K, (const uint16_t*)row, out);
    else dot_f32<R>((const float* const*)xs, p.K, row, p.kind, sc, n / p.bn, p.bk, out);
}

// Weight row n of expert e against `count` input rows (given by index into `rows` of `stride` elements).
void dots_all(const Proj& p, int64_t e, int64_t n, const void* rows, const int64_t* which, int64_t count,
              const Table8Bf16& t, float* out) {
    const int64_t elem = p.path == F32 ? 4 : 2;
    for (int64_t i0 = 0; i0 < count; i0 += MB) {
        const int64_t r = count - i0 < MB ? count - i0 : MB;
        const void* xs[MB];
        for (int64_t i = 0; i < r; ++i) xs[i] = (const char*)rows + which[i0 + i] * p.stride * elem;
        switch (r) {
            case 1: dots<1>(p, e, n, xs, t, out + i0); break;
            case 2: dots<2>(p, e, n, xs, t, out + i0); break;
            case 3: dots<3>(p, e, n, xs, t, out + i0); break;
            default: dots<4>(p, e, n, xs, t, out + i0); break;
        }
    }
}

Path choose(int kind, int64_t K, int64_t bk, bool bf16, bool wide) {
    if (bf16 && wide && cumulo_cpu::avx512_bf16_vbmi()) {
        if (kind == FP8 && (bk % 64 == 0 || bk >= K)) return TABLE;
        if (kind == BF16) return DOT_BF16;
    }
    return F32;
}

inline float round_as(float v, bool bf16) { return bf16 ? to_float(from_float(v)) : v; }

void softmax_topk(const void* logits, bool bf16, int64_t T, int64_t E, int64_t k, bool norm, int64_t* ids,
                  float* weights) {
    std::vector<float> p(E);
    for (int64_t t = 0; t < T; ++t) {
        float m = -INFINITY, sum = 0.0f;
        for (int64_t e = 0; e < E; ++e) {
            p[e] = bf16 ? to_float(((const uint16_t*)logits)[t * E + e]) : ((const float*)logits)[t * E + e];
            m = p[e] > m ? p[e] : m;
        }
        for (int64_t e = 0; e < E; ++e) sum += p[e] = expf(p[e] - m);
        float kept = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; ++e)
                if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
            ids[t * k + j] = best;
            weights[t * k + j] = p[best] / sum;
            kept += weights[t * k + j];
            p[best] = -1.0f;  // taken
        }
        if (norm)
            for (int64_t j = 0; j < k; ++j) weights[t * k + j] /= kept;
    }
}

// DeepSeek-V3's router (models.deepseek.DeepseekRouter) over fp32 logits [T, E]: scores = sigmoid(logits); the
// selection adds bias[e] to each score; with n_group > 1 the experts fall in n_group equal groups, a group's score
// is the sum of its two best biased scores, and only the topk_group best groups stay eligible; the k best eligible
// biased scores are chosen (in descending order). Their unbiased scores, divided by their sum (+ 1e-20) when norm
// is set, times scale, are the weights. Exact ties go to the lower id (or group), where torch's topk leaves the
// order among equal values unspecified.
void sigmoid_group_topk(const float* logits, const float* bias, int64_t T, int64_t E, int64_t n_group,
                        int64_t topk_group, int64_t k, bool norm, float scale, int64_t* ids, float* weights) {
    std::vector<float> score(E), biased(E), group(n_group > 1 ? n_group : 1);
    std::vector<char> keep(n_group > 1 ? n_group : 1);
    const int64_t width = n_group > 1 ? E / n_group : E;
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t e = 0; e < E; ++e) {
            score[e] = 1.0f / (1.0f + expf(-logits[t * E + e]));
            biased[e] = score[e] + (bias ? bias[e] : 0.0f);
        }
        if (n_group > 1) {
            for (int64_t gi = 0; gi < n_group; ++gi) {
                float a = -INFINITY, b = -INFINITY;  // the group's best and second best
                for (int64_t e = gi * width; e < (gi + 1) * width; ++e) {
                    const float v = biased[e];
                    if (v > a) b = a, a = v;
                    else if (v > b) b = v;
                }
                group[gi] = a + b;
                keep[gi] = 0;
            }
            for (int64_t j = 0; j < topk_group && j < n_group; ++j) {
                int64_t best = -1;
                for (int64_t gi = 0; gi < n_group; ++gi)
                    if (!keep[gi] && (best < 0 || group[gi] > group[best])) best = gi;
                keep[best] = 1;
            }
            for (int64_t e = 0; e < E; ++e)
                if (!keep[e / width]) biased[e] = -INFINITY;
        }
        float kept = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; ++e)
                if (!std::isnan(biased[e]) && (best < 0 || biased[e] > biased[best])) best = e;
            ids[t * k + j] = best;
            weights[t * k + j] = score[best];
            kept += score[best];
            biased[best] = NAN;  // taken
        }
        for (int64_t j = 0; j < k; ++j) {
            if (norm) weights[t * k + j] /= kept + 1e-20f;
            weights[t * k + j] *= scale;
        }
    }
}

}  // namespace

// y [T, H] = the routed experts' weighted output for x [T, H]; ids [T, k] (int64, each in [0, E)) and weights
// [T, k] (fp32). With router logits [T, E] (x's dtype; else null) the routing is done here first and written
// to ids and weights: softmax over all experts in fp32, the k most probable (the lower id first on a tie),
// rescaled to sum to 1 when norm_topk = 1, as Qwen3-MoE and Mixtral route (moe.softmax_topk). router = 1 routes
// as DeepSeek-V3 instead (sigmoid_group_topk above): logits are then fp32 whatever x is, bias [E] fp32 (or null),
// n_group / topk_group the group limit (n_group <= 1: none), scale the routed scaling factor.
// gate_up / down: E addresses each (see the header); *_scales: E addresses of fp8 block scales (kind 0; e8m0 = 1:
// E8M0 bytes, else fp32), blocks of bn x bk. Returns 1 (nothing written) for an id out of range. wide_ok = 0
// keeps the AVX2 path (tests use it).
#define CUMULO_MOE_EXPERTS(X)                                                                                \
    X(const void*, x) X(int64_t, T) X(int64_t, H) X(int64_t, I) X(int64_t, k) X(int64_t, E) X(int64_t*, ids)  \
        X(float*, weights) X(const void*, logits) X(int, norm_topk) X(int, kind) X(int, e8m0)                \
            X(const int64_t*, gate_up)                                                                       \
            X(const int64_t*, gate_up_scales) X(int64_t, gate_up_bn) X(int64_t, gate_up_bk)                        \
                X(const int64_t*, down) X(const int64_t*, down_scales) X(int64_t, down_bn) X(int64_t, down_bk)     \
                    X(void*, y) X(int, bf16) X(int, threads) X(int, wide_ok) X(int, router)              \
                        X(const float*, bias) X(int64_t, n_group) X(int64_t, topk_group) X(float, scale)
CUMULO_KERNEL(cumulo_moe_experts, CUMULO_MOE_EXPERTS) {
    const int64_t T = a.T, H = a.H, I = a.I, k = a.k, E = a.E, S = T * a.k;
    const bool bf16 = a.bf16 != 0, wide = a.wide_ok != 0;
    if (a.logits && a.router == 1)
        sigmoid_group_topk((const float*)a.logits, a.bias, T, E, a.n_group, a.topk_group, k, a.norm_topk != 0,
                           a.scale, a.ids, a.weights);
    else if (a.logits) softmax_topk(a.logits, bf16, T, E, k, a.norm_topk != 0, a.ids, a.weights);
    for (int64_t s = 0; s < S; ++s)
        if (a.ids[s] < 0 || a.ids[s] >= E) return 1;
    // Slots grouped by expert (counting sort, token order within an expert): used[u] is the u-th expert in use,
    // its slots slots[first[u] .. first[u + 1]), as token rows (tok) and slot indices.
    std::vector<int64_t> count(E + 1, 0), used, first, slots(S), tok(S);
    for (int64_t s = 0; s < S; ++s) ++count[a.ids[s] + 1];
    for (int64_t e = 0; e < E; ++e) {
        if (count[e + 1]) used.push_back(e), first.push_back(count[e]);
        count[e + 1] += count[e];
    }
    first.push_back(S);
    for (int64_t s = 0; s < S; ++s) slots[count[a.ids[s]]++] = s;
    for (int64_t s = 0; s < S; ++s) tok[s] = slots[s] / k;
    const int64_t U = (int64_t)used.size();

    Proj gu{a.gate_up, a.gate_up_scales, 2 * I, H, a.gate_up_bn, a.gate_up_bk, a.kind, a.e8m0 != 0, F32, 0};
    Proj dn{a.down, a.down_scales, H, I, a.down_bn, a.down_bk, a.kind, a.e8m0 != 0, F32, 0};
    gu.path = choose(a.kind, H, gu.bk, bf16, wide);
    dn.path = choose(a.kind, I, dn.bk, bf16, wide);
    gu.stride = gu.path == F32 ? H : (H + 63) / 64 * 64;
    dn.stride = dn.path == F32 ? I : (I + 63) / 64 * 64;
    const int64_t elem_gu = gu.path == F32 ? 4 : 2, elem_dn = dn.path == F32 ? 4 : 2;
    Scratch<char> xin(T * gu.stride * elem_gu), hid(S * dn.stride * elem_dn);  // zeroed: padding adds nothing
    Scratch<float> out(S * H);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < H; ++c) {
            const float v = bf16 ? to_float(((const uint16_t*)a.x)[t * H + c]) : ((const float*)a.x)[t * H + c];
            put(xin.data(), gu.path, gu.stride, t, c, v);
        }
    static const Table8Bf16 e4m3 =
        cumulo_cpu::avx512_bf16_vbmi() ? make_table8_bf16() : Table8Bf16{};

#pragma omp parallel num_threads(a.threads)
    {
        std::vector<float> g(S), up(S);
        // gate and up row n of each expert in use, over its rows: h = silu(gate) * up, rounded as torch rounds.
#pragma omp for schedule(static)
        for (int64_t item = 0; item < U * I; ++item) {
            const int64_t u = item / I, n = item % I, f = first[u], c = first[u + 1] - f;
            if (c == 1 && gu.path == TABLE) {  // one row (decode): gate row n and up row n in one pass over it
                const uint8_t* w = (const uint8_t*)(intptr_t)gu.w[used[u]];
                const uint8_t* rows[2] = {w + n * H, w + (n + I) * H};
                const int64_t rbs[2] = {n / gu.bn, (n + I) / gu.bn};
                float r[2];
                dot_table_rows<2>((const uint16_t*)(xin.data() + tok[f] * gu.stride * elem_gu), H, rows,
                                  gu.scales_of(used[u]), rbs, gu.bk, e4m3, r);
                const float gv = round_as(r[0], bf16), uv = round_as(r[1], bf16);
                const float act = round_as(gv / (1.0f + expf(-gv)), bf16);
                put(hid.data(), dn.path, dn.stride, slots[f], n, act * uv);
                continue;
            }
            dots_all(gu, used[u], n, xin.data(), tok.data() + f, c, e4m3, g.data());
            dots_all(gu, used[u], n + I, xin.data(), tok.data() + f, c, e4m3, up.data());
            for (int64_t i = 0; i < c; ++i) {
                const float gv = round_as(g[i], bf16), uv = round_as(up[i], bf16);
                const float act = round_as(gv / (1.0f + expf(-gv)), bf16);
                put(hid.data(), dn.path, dn.stride, slots[f + i], n, act * uv);
            }
        }
        // down row n of each expert in use, over its slots' hidden rows.
#pragma omp for schedule(static)
        for (int64_t item = 0; item < U * H; ++item) {
            const int64_t u = item / H, n = item % H, f = first[u], c = first[u + 1] - f;
            float o[MB * 16];
            for (int64_t i0 = 0; i0 < c; i0 += MB * 16) {
                const int64_t r = c - i0 < MB * 16 ? c - i0 : MB * 16;
                dots_all(dn, used[u], n, hid.data(), slots.data() + f + i0, r, e4m3, o);
                for (int64_t i = 0; i < r; ++i) out[slots[f + i0 + i] * H + n] = round_as(o[i], bf16);
            }
        }
        // y[t] = sum_j (out[t, j] * w[t, j]), each product rounded, the sum in fp32 and rounded once.
#pragma omp for schedule(static)
        for (int64_t i = 0; i < T * H; ++i) {
            const int64_t t = i / H, c = i % H;
            float sum = 0.0f;
            for (int64_t j = 0; j < k; ++j)
                sum += round_as(out[(t * k + j) * H + c] * round_as(a.weights[t * k + j], bf16), bf16);
            if (bf16) ((uint16_t*)a.y)[i] = from_float(sum);
            else ((float*)a.y)[i] = sum;
        }
    }
    return 0;
}

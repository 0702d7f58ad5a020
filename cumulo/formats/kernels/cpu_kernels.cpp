// Fused dequantize-and-multiply kernels for x86-64 CPUs with AVX2, FMA and F16C (cumulo.formats.kernels.cpu).
//
// y[m, n] = sum_k x[m, k] * value(code[n, k]) * scale(n, k), for few rows m (decode: M = 1). Each weight byte is
// read once and decoded in registers, so the matmul streams 1 byte (FP8) or half a byte (FP4) per weight.
//
// FP8 E4M3 decode: moving the code's sign to bit 31 and its exponent+mantissa to bits 26..20 gives an fp32
// whose value is the E4M3 value times 2^-120 (bias 127 versus 7; subnormals map to subnormals); the 2^120 is
// folded into the block scale. (An F16C variant, via fp16 and vcvtph2ps, measured ~10% slower on AMD EPYC.)
// FP4 E2M1 decode: a 16-entry byte table of 2 x value (0, 1, 2, 3, 4, 6, 8, 12 and negatives), looked up with
// pshufb; the 1/2 is folded into the E8M0 block scale.
// Plain C ABI (called through ctypes), OpenMP over output rows.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

namespace {

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

constexpr int MB = 4;  // rows of x handled per pass over a weight row
constexpr int MB_BF16 = 8;  // the same for the bf16 MXFP4 kernel, whose nibble decode costs more than the products:
                            // decoded once per 8 rows, not 4 (SmolLM2 decode at 16 sequences 490 -> 617 tok/s)
constexpr int NR = 4;  // weight rows per pass in the single-row (M = 1) bf16 decode kernels

float e4m3_value(uint8_t c) {
    int s = c >> 7, e = (c >> 3) & 0xF, m = c & 7;
    if (e == 15 && m == 7) return NAN;
    float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + m / 8.0f, e - 7);
    return s ? -v : v;
}

const float kE2M1[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};

// E8M0 -> float by placing the code in fp32's exponent field; code 0 (2^-127) is an fp32 subnormal.
inline float e8m0_value(uint8_t c) {
    union { uint32_t u; float f; } v;
    v.u = c == 0 ? 0x00400000u : c == 0xFF ? 0x7FC00000u : (uint32_t)c << 23;
    return v.f;
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 16 E4M3 codes -> 16 floats, each 2^-8 times its value.
// Sign-extending the byte to 32 bits and shifting left by 20 puts the sign at bit 31 and exponent+mantissa at
// bits 26..20; the mask clears the sign's copies in bits 30..27. The result is an fp32 equal to 2^-120 times
// the E4M3 value (E4M3 subnormals become fp32 subnormals, rare in scaled weights), in 3 integer ops per 8 codes;
// the 2^120 is folded into the block scale.
inline __m256 decode_e4m3_8(const uint8_t* p) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32((int)0x87F00000)));
}

inline void decode_e4m3_16(const uint8_t* p, __m256& w0, __m256& w1) {
    w0 = decode_e4m3_8(p);
    w1 = decode_e4m3_8(p + 8);
}

// The block scale times 2^120 (see decode_e4m3_8), kept finite: scales above 2^7 take a second multiply.
struct ScaleFactor {
    __m256 a, b;
    bool two;
    explicit ScaleFactor(float s) {
        two = !(s <= 128.0f);
        a = _mm256_set1_ps(two ? s : s * 0x1p120f);
        b = _mm256_set1_ps(0x1p120f);
    }
    inline __m256 apply(__m256 w) const {
        w = _mm256_mul_ps(w, a);
        return two ? _mm256_mul_ps(w, b) : w;
    }
};

// 16 bytes of packed E2M1 (element 0 in the low nibble) -> 32 floats, each 2 times its value.
inline void decode_e2m1_32(const uint8_t* p, __m256 w[4]) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i low = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, low));
    __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), low));
    __m128i a = _mm_unpacklo_epi8(lo, hi), c = _mm_unpackhi_epi8(lo, hi);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)));
}

// scale of block (row block rb, column block kb): fp32 table or E8M0 byte table.
struct Scales {
    const float* f32;
    const uint8_t* e8m0;
    int64_t cols;
    inline float at(int64_t rb, int64_t kb) const {
        return f32 ? f32[rb * cols + kb] : e8m0_value(e8m0[rb * cols + kb]);
    }
};

// One weight row against R rows of x (R is a template argument so the accumulators stay in registers).
// Weights are multiplied by their block scale as they are decoded, and each row keeps 2C independent
// accumulators (C groups of 16 codes per step, C <= 4 / R and dividing the block) so FMA latency never
// serialises the loop. bk is a multiple of 16, or K itself.
template <int R, int C>
void fp8_row(const float* x, int64_t K, const uint8_t* row, const Scales& sc, int64_t rb, int64_t bk,
             float* out) {
    __m256 acc[R][2 * C];
    float tail[R];
    for (int i = 0; i < R; ++i) {
        tail[i] = 0.0f;
        for (int c = 0; c < 2 * C; ++c) acc[i][c] = _mm256_setzero_ps();
    }
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        const float s = sc.at(rb, kb);
        const ScaleFactor sv(s);
        int64_t k = k0;
        for (; k + 16 * C <= k1; k += 16 * C) {
            for (int c = 0; c < C; ++c) {
                __m256 w0, w1;
                decode_e4m3_16(row + k + 16 * c, w0, w1);
                w0 = sv.apply(w0);
                w1 = sv.apply(w1);
                for (int i = 0; i < R; ++i) {
                    const float* xr = x + i * K + k + 16 * c;
                    acc[i][2 * c] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[i][2 * c]);
                    acc[i][2 * c + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[i][2 * c + 1]);
                }
            }
        }
        for (; k + 16 <= k1; k += 16) {
            __m256 w0, w1;
            decode_e4m3_16(row + k, w0, w1);
            w0 = sv.apply(w0);
            w1 = sv.apply(w1);
            for (int i = 0; i < R; ++i) {
                acc[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * K + k), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * K + k + 8), acc[i][1]);
            }
        }
        for (; k < k1; ++k) {
            const float w = e4m3_value(row[k]) * s;
            for (int i = 0; i < R; ++i) tail[i] += w * x[i * K + k];
        }
    }
    for (int i = 0; i < R; ++i) {
        __m256 sum = acc[i][0];
        for (int c = 1; c < 2 * C; ++c) sum = _mm256_add_ps(sum, acc[i][c]);
        out[i] = hsum(sum) + tail[i];
    }
}

// AVX-512 version of fp8_row (chosen at run time when the CPU has AVX512F/BW): 16 codes per step, decoded
// through fp16 instead of fp32. Sign-extending a code to 16 bits, shifting left by 7 and masking with 0xBF80
// gives the fp16 whose value is the E4M3 value times 2^-8, subnormals included (both formats' subnormal
// steps line up); vcvtph2ps widens 16 of them at once. Products are summed per scale block and the block's
// scale (times 2^8) is applied once per block, not per weight. Rows a thread reads are contiguous, so the
// next rows are prefetched across row ends; code tails shorter than 16 use masked loads (zeros add nothing).
constexpr int kAhead = 16384;  // bytes of codes prefetched ahead of the loads (into L2)

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 decode_e4m3_16_512(const uint8_t* p,
                                                                                     __mmask16 m) {
    const __m256i h = _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(m, p));
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80)));
}

template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void fp8_row_512(const float* x, int64_t K,
                                                                       const uint8_t* row, const Scales& sc,
                                                                       int64_t rb, int64_t bk, float* out) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        __m512 blk[R][C];
        for (int i = 0; i < R; ++i)
            for (int c = 0; c < C; ++c) blk[i][c] = _mm512_setzero_ps();
        int64_t k = k0;
        for (; k + 16 * C <= k1; k += 16 * C) {
            _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
            for (int c = 0; c < C; ++c) {
                const __m512 w = decode_e4m3_16_512(row + k + 16 * c, 0xFFFF);
                for (int i = 0; i < R; ++i)
                    blk[i][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * K + k + 16 * c), blk[i][c]);
            }
        }
        for (; k < k1; k += 16) {
            const __mmask16 m = k1 - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k1 - k)) - 1u);
            const __m512 w = decode_e4m3_16_512(row + k, m);
            for (int i = 0; i < R; ++i)
                blk[i][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + i * K + k), blk[i][0]);
        }
        const __m512 s = _mm512_set1_ps(sc.at(rb, kb) * 256.0f);
        for (int i = 0; i < R; ++i) {
            __m512 sum = blk[i][0];
            for (int c = 1; c < C; ++c) sum = _mm512_add_ps(sum, blk[i][c]);
            acc[i] = _mm512_fmadd_ps(sum, s, acc[i]);
        }
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

bool has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

// FP8 with bf16 activations (AVX512-BF16 + VBMI): E4M3 is a subset of bf16, so codes are looked up as exact
// bf16 values and multiplied with vdpbf16ps, 32 products per instruction. Per 64 codes: two vpermi2b lookups
// (the low and the high byte of the bf16 of the code's magnitude, 128-entry tables in four registers), the sign
// OR-ed into the high byte, and two byte unpacks that interleave them into 2 x 32 bf16. The unpacks work within
// 128-bit lanes, so the weights come out in a fixed lane order; x is permuted into the same order once per
// call (xperm), and a dot product does not care about order. Block scales: per block when the block spans whole
// 64-code chunks (DeepSeek 128x128, per-channel), or per 128-bit lane (16 codes) for MX's 32-code blocks.
struct E4M3Tables {
    __m512i lo0, lo1, hi0, hi1;
    bool twos;  // codes are two's complement integers (MX INT8): looked up by |code|, sign from bit 7
};

// The byte tables for any 8-bit element whose 128 magnitudes are exact in bf16 and whose bit 7 is the sign
// (E4M3 when mags is null; HiF8 through cumulo_table8_linear), or two's complement integers (twos: MX INT8,
// whose codes never hold -128). NaN and Inf codes, which weights never hold, become 0.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) E4M3Tables make_e4m3_tables(const float* mags = nullptr,
                                                                                  bool twos = false) {
    alignas(64) uint8_t lo[128], hi[128];
    for (int c = 0; c < 128; ++c) {
        float v = mags ? mags[c] : e4m3_value((uint8_t)c);
        if (!isfinite(v)) v = 0.0f;
        uint32_t u;
        memcpy(&u, &v, 4);
        lo[c] = (uint8_t)(u >> 16);
        hi[c] = (uint8_t)(u >> 24);
    }
    return {_mm512_load_si512(lo), _mm512_load_si512(lo + 64), _mm512_load_si512(hi), _mm512_load_si512(hi + 64),
            twos};
}

// x (bf16 bits, K of them) -> the lane order the unpacks produce, zero-padded to whole 64-code chunks.
void permute_x(const uint16_t* x, int64_t K, uint16_t* out) {
    const int64_t chunks = (K + 63) / 64;
    for (int64_t c = 0; c < chunks; ++c)
        for (int l = 0; l < 4; ++l)
            for (int j = 0; j < 8; ++j) {
                const int64_t a = c * 64 + 16 * l + j, b = a + 8;
                out[c * 64 + 8 * l + j] = a < K ? x[a] : 0;
                out[c * 64 + 32 + 8 * l + j] = b < K ? x[b] : 0;
            }
}

__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512bf16"))) inline void decode_e4m3_64_bf16(
    const uint8_t* p, __mmask64 m, const E4M3Tables& t, __m512i& w0, __m512i& w1) {
    const __m512i s = _mm512_maskz_loadu_epi8(m, p);
    const __m512i c = t.twos ? _mm512_abs_epi8(s) : s;
    const __m512i lo = _mm512_permutex2var_epi8(t.lo0, c, t.lo1);
    const __m512i hi = _mm512_or_si512(_mm512_permutex2var_epi8(t.hi0, c, t.hi1),
                                       _mm512_and_si512(s, _mm512_set1_epi8((char)0x80)));
    w0 = _mm512_unpacklo_epi8(lo, hi);
    w1 = _mm512_unpackhi_epi8(lo, hi);
}

__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512bf16"))) inline void decode_e4m3_64_bf16_full(
    const uint8_t* p, const E4M3Tables& t, __m512i& w0, __m512i& w1) {
    const __m512i s = _mm512_loadu_si512(p);
    const __m512i c = t.twos ? _mm512_abs_epi8(s) : s;
    const __m512i lo = _mm512_permutex2var_epi8(t.lo0, c, t.lo1);
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.hi0, c, t.hi1), s,
                                                 _mm512_set1_epi8((char)0x80), 0xF8);  // a | (b & c)
    w0 = _mm512_unpacklo_epi8(lo, hi);
    w1 = _mm512_unpackhi_epi8(lo, hi);
}

// One weight row against R rows of permuted bf16 x (row stride xs). lane_scales: MX-style blocks of 16 or 32.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512bf16"))) void fp8_row_bf16(
    const uint16_t* xp, int64_t xs, int64_t K, const uint8_t* row, const Scales& sc, int64_t rb, int64_t bk,
    const E4M3Tables& t, float* out) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    if (bk % 64 == 0 || bk >= K) {
        for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
            const int64_t k1 = k0 + bk < K ? k0 + bk : K;
            __m512 b0[R], b1[R];
            for (int i = 0; i < R; ++i) b0[i] = b1[i] = _mm512_setzero_ps();
            for (int64_t k = k0; k < k1; k += 64) {
                _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
                const __mmask64 m = k1 - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k1 - k)) - 1);
                __m512i w0, w1;
                if (k1 - k >= 64) decode_e4m3_64_bf16_full(row + k, t, w0, w1);
                else decode_e4m3_64_bf16(row + k, m, t, w0, w1);
                for (int i = 0; i < R; ++i) {
                    const uint16_t* xr = xp + i * xs + k;
                    b0[i] = _mm512_dpbf16_ps(b0[i], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xr));
                    b1[i] = _mm512_dpbf16_ps(b1[i], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xr + 32));
                }
            }
            const __m512 s = _mm512_set1_ps(sc.at(rb, kb));
            for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_add_ps(b0[i], b1[i]), s, acc[i]);
        }
    } else {  // bk is 16 or 32: a scale per 128-bit lane, fp32 lane j of a product belongs to code lane j / 4
        const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        for (int64_t k = 0; k < K; k += 64) {
            _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
            const __mmask64 m = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
            __m512i w0, w1;
            decode_e4m3_64_bf16(row + k, m, t, w0, w1);
            __m512 s;
            if (bk == 32) {  // two blocks per chunk: fp32 lanes 0-7 and 8-15
                const int64_t kb = k / 32;
                s = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(sc.at(rb, kb)),
                                         _mm512_set1_ps(k + 32 < K ? sc.at(rb, kb + 1) : 0.0f));
            } else {
                alignas(16) float ls[4];
                for (int l = 0; l < 4; ++l) ls[l] = k + 16 * l < K ? sc.at(rb, (k + 16 * l) / bk) : 0.0f;
                s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_load_ps(ls)));
            }
            for (int i = 0; i < R; ++i) {
                const uint16_t* xr = xp + i * xs + k;
                __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xr));
                p = _mm512_dpbf16_ps(p, (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xr + 32));
                acc[i] = _mm512_fmadd_ps(p, s, acc[i]);
            }
        }
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

bool has_avx512_bf16_vbmi() {
    return has_avx512() && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
}

inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// MXFP4 with bf16 activations: E2M1 values are exact bf16, looked up per nibble with vpshufb (a 16-entry table
// of the bf16's low bytes and one of its high bytes, sign in the nibble's top bit). 64 code bytes hold 128
// elements, the even ones in low nibbles; each 128-bit lane holds exactly one 32-element MX block, so the
// E8M0 scales go on per lane. x is permuted once per call into the order the unpacks produce: per 64-byte
// chunk, even elements of each lane's first and second 8 bytes, then the odd ones.
void permute_x_fp4(const uint16_t* x, int64_t K, uint16_t* out) {
    for (int64_t c = 0; c < K / 128 + (K % 128 != 0); ++c)
        for (int part = 0; part < 4; ++part)  // even/first, even/second, odd/first, odd/second half-lanes
            for (int l = 0; l < 4; ++l)
                for (int i = 0; i < 8; ++i) {
                    const int64_t byte = c * 64 + 16 * l + (part & 1) * 8 + i;
                    const int64_t e = 2 * byte + (part >> 1);
                    out[c * 128 + part * 32 + 8 * l + i] = e < K ? x[e] : 0;
                }
}

// The low and high bytes of the bf16 of each E2M1 code, repeated in each 128-bit lane (for vpshufb).
struct E2M1Bf16Bytes {
    alignas(64) uint8_t lo[64];
    alignas(64) uint8_t hi[64];
    E2M1Bf16Bytes() {
        for (int c = 0; c < 64; ++c) {
            const float v = kE2M1[c & 15];
            uint32_t u;
            memcpy(&u, &v, 4);
            lo[c] = (uint8_t)(u >> 16);
            hi[c] = (uint8_t)(u >> 24);
        }
    }
};
const E2M1Bf16Bytes kE2M1Bf16;

template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void mxfp4_row_bf16(const uint16_t* xp, int64_t xs,
                                                                           int64_t K, const uint8_t* row,
                                                                           const uint8_t* scales, float* out) {
    const __m512i TL = _mm512_load_si512(kE2M1Bf16.lo), TH = _mm512_load_si512(kE2M1Bf16.hi);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t bytes = K / 2;
    for (int64_t b = 0; b < bytes; b += 64) {
        _mm_prefetch((const char*)(row + b) + kAhead, _MM_HINT_T1);
        const int64_t left = bytes - b;
        const __mmask64 m = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        const __m512i c = _mm512_maskz_loadu_epi8(m, row + b);
        const __m512i ne = _mm512_and_si512(c, low), no = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
        const __m512i le = _mm512_shuffle_epi8(TL, ne), he = _mm512_shuffle_epi8(TH, ne);
        const __m512i lo = _mm512_shuffle_epi8(TL, no), ho = _mm512_shuffle_epi8(TH, no);
        const __m512i w[4] = {_mm512_unpacklo_epi8(le, he), _mm512_unpackhi_epi8(le, he),
                              _mm512_unpacklo_epi8(lo, ho), _mm512_unpackhi_epi8(lo, ho)};
        // four E8M0 scales (blocks b/16 .. b/16 + 3) -> fp32 by placing the code in the exponent field
        uint32_t four = 0;  // the chunk's four scale bytes (fewer in a tail chunk; missing ones stay 0)
        memcpy(&four, scales + b / 16, left >= 64 ? 4 : (size_t)((left + 15) / 16));
        const __m128i e = _mm_slli_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)four)), 23);
        const __m512 s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_castsi128_ps(e)));
        for (int i = 0; i < R; ++i) {
            const uint16_t* xr = xp + i * xs + 2 * b;
            __m512 p = _mm512_setzero_ps();
            for (int q = 0; q < 4; ++q)
                p = _mm512_dpbf16_ps(p, (__m512bh)w[q], (__m512bh)_mm512_loadu_si512(xr + 32 * q));
            acc[i] = _mm512_fmadd_ps(p, s, acc[i]);
        }
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// Single-row decode (M = 1): NR weight rows per pass, sharing each chunk's x loads. One row of a SmolLM2-sized
// matrix is only 288 code bytes, so a one-row loop spends as long on set-up, the dependent dot-product chain
// and the final reduction as on the codes; NR independent rows keep the execution ports busy instead
// (Zen 4: 4.2 -> see docs/formats.md for the GB/s per thread).
template <int NR>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void mxfp4_rows_bf16(const uint16_t* xp, int64_t K,
                                                                            const uint8_t* rows,
                                                                            const uint8_t* scales, float* out) {
    const __m512i TL = _mm512_load_si512(kE2M1Bf16.lo), TH = _mm512_load_si512(kE2M1Bf16.hi);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int64_t bytes = K / 2, nb = K / 32;
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < bytes; b += 64) {
        const int64_t left = bytes - b;
        const __mmask64 m = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        const uint16_t* xr = xp + 2 * b;
        const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 32);
        const __m512i x2 = _mm512_loadu_si512(xr + 64), x3 = _mm512_loadu_si512(xr + 96);
        for (int r = 0; r < NR; ++r) {
            const uint8_t* row = rows + r * bytes;
            _mm_prefetch((const char*)(row + b) + kAhead, _MM_HINT_T1);
            const __m512i c = _mm512_maskz_loadu_epi8(m, row + b);
            const __m512i ne = _mm512_and_si512(c, low), no = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
            const __m512i le = _mm512_shuffle_epi8(TL, ne), he = _mm512_shuffle_epi8(TH, ne);
            const __m512i lo = _mm512_shuffle_epi8(TL, no), ho = _mm512_shuffle_epi8(TH, no);
            uint32_t four = 0;  // this chunk's four scale bytes (fewer in a tail chunk; missing ones stay 0)
            const uint8_t* sp = scales + r * nb + b / 16;
            if (left >= 64) memcpy(&four, sp, 4);
            else memcpy(&four, sp, (size_t)((left + 15) / 16));
            const __m128i e = _mm_slli_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)four)), 23);
            const __m512 s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_castsi128_ps(e)));
            __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_unpacklo_epi8(le, he), (__m512bh)x0);
            __m512 p1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_unpackhi_epi8(le, he), (__m512bh)x1);
            p0 = _mm512_dpbf16_ps(p0, (__m512bh)_mm512_unpacklo_epi8(lo, ho), (__m512bh)x2);
            p1 = _mm512_dpbf16_ps(p1, (__m512bh)_mm512_unpackhi_epi8(lo, ho), (__m512bh)x3);
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), s, acc[r]);
        }
    }
    for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// bf16 x [M, K] (K % 32 == 0) -> bf16 y [M, N] through mxfp4_row_bf16 (mxfp4_rows_bf16 when M = 1).
void mxfp4_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
                       const uint8_t* scales, uint16_t* y, int nthreads) {
    const int64_t xs = (K + 127) / 128 * 128;
    Scratch<uint16_t> xp(M * xs);
    for (int64_t m = 0; m < M; ++m) permute_x_fp4(x + m * K, K, xp.data() + m * xs);
    if (M == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t g = 0; g < (N + NR - 1) / NR; ++g) {
            const int64_t n0 = g * NR, nr = N - n0 < NR ? N - n0 : NR;
            float out[NR];
            if (nr == NR) mxfp4_rows_bf16<NR>(xp.data(), K, codes + n0 * (K / 2), scales + n0 * (K / 32), out);
            else
                for (int64_t r = 0; r < nr; ++r)
                    mxfp4_rows_bf16<1>(xp.data(), K, codes + (n0 + r) * (K / 2), scales + (n0 + r) * (K / 32),
                                       out + r);
            for (int64_t r = 0; r < nr; ++r) y[n0 + r] = round_bf16(out[r]);
        }
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB_BF16];
        const uint8_t* row = codes + n * (K / 2);
        const uint8_t* sc = scales + n * (K / 32);
        for (int64_t m0 = 0; m0 < M; m0 += MB_BF16) {
            const int64_t mb = M - m0 < MB_BF16 ? M - m0 : MB_BF16;
            const uint16_t* xm = xp.data() + m0 * xs;
            switch (mb) {
                case 1: mxfp4_row_bf16<1>(xm, xs, K, row, sc, out); break;
                case 2: mxfp4_row_bf16<2>(xm, xs, K, row, sc, out); break;
                case 3: mxfp4_row_bf16<3>(xm, xs, K, row, sc, out); break;
                case 4: mxfp4_row_bf16<4>(xm, xs, K, row, sc, out); break;
                case 5: mxfp4_row_bf16<5>(xm, xs, K, row, sc, out); break;
                case 6: mxfp4_row_bf16<6>(xm, xs, K, row, sc, out); break;
                case 7: mxfp4_row_bf16<7>(xm, xs, K, row, sc, out); break;
                default: mxfp4_row_bf16<8>(xm, xs, K, row, sc, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = round_bf16(out[i]);
        }
    }
}

// Single-row decode (M = 1) for blocks spanning whole 64-code chunks (DeepSeek 128 x 128, per channel, per
// tensor): NR weight rows per pass share each chunk's two x loads and keep NR independent chains in flight.
template <int NR>
__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512bf16"))) void fp8_rows_bf16(
    const uint16_t* xp, int64_t K, const uint8_t* rows, const Scales& sc, int64_t n0, int64_t bn, int64_t bk,
    const E4M3Tables& t, float* out) {
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        __m512 b0[NR], b1[NR];
        for (int r = 0; r < NR; ++r) b0[r] = b1[r] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 64) {
            const __m512i x0 = _mm512_loadu_si512(xp + k), x1 = _mm512_loadu_si512(xp + k + 32);
            const __mmask64 m = k1 - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k1 - k)) - 1);
            for (int r = 0; r < NR; ++r) {
                const uint8_t* row = rows + r * K;
                _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
                __m512i w0, w1;
                if (k1 - k >= 64) decode_e4m3_64_bf16_full(row + k, t, w0, w1);
                else decode_e4m3_64_bf16(row + k, m, t, w0, w1);
                b0[r] = _mm512_dpbf16_ps(b0[r], (__m512bh)w0, (__m512bh)x0);
                b1[r] = _mm512_dpbf16_ps(b1[r], (__m512bh)w1, (__m512bh)x1);
            }
        }
        for (int r = 0; r < NR; ++r)
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(b0[r], b1[r]), _mm512_set1_ps(sc.at((n0 + r) / bn, kb)), acc[r]);
    }
    for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// The same for MX's 32-code blocks (K % 32 == 0): two scales per 64-code chunk, on fp32 lanes 0-7 and 8-15.
template <int NR>
__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512bf16"))) void fp8_rows_bf16_mx(
    const uint16_t* xp, int64_t K, const uint8_t* rows, const Scales& sc, int64_t n0, int64_t bn,
    const E4M3Tables& t, float* out) {
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        const __m512i x0 = _mm512_loadu_si512(xp + k), x1 = _mm512_loadu_si512(xp + k + 32);
        const bool full = K - k >= 64;
        const __mmask64 m = full ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        const int64_t kb = k / 32;
        for (int r = 0; r < NR; ++r) {
            const uint8_t* row = rows + r * K;
            _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
            __m512i w0, w1;
            if (full) decode_e4m3_64_bf16_full(row + k, t, w0, w1);
            else decode_e4m3_64_bf16(row + k, m, t, w0, w1);
            const int64_t rb = (n0 + r) / bn;
            const __m512 s = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(sc.at(rb, kb)),
                                                  _mm512_set1_ps(full ? sc.at(rb, kb + 1) : 0.0f));
            __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w0, (__m512bh)x0);
            p = _mm512_dpbf16_ps(p, (__m512bh)w1, (__m512bh)x1);
            acc[r] = _mm512_fmadd_ps(p, s, acc[r]);
        }
    }
    for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// bf16 x [M, K] -> bf16 y [M, N] through fp8_row_bf16 (fp8_rows_bf16[_mx] when M = 1 and the blocks allow).
// False if the block shape is not one it handles.
bool fp8_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const Scales& sc,
                     int64_t bn, int64_t bk, uint16_t* y, int nthreads, const float* mags = nullptr,
                     bool twos = false) {
    if (!(bk % 64 == 0 || bk >= K || ((bk == 16 || bk == 32) && K % bk == 0))) return false;
    static const E4M3Tables e4m3 = make_e4m3_tables();
    const E4M3Tables tables = mags ? make_e4m3_tables(mags, twos) : e4m3;
    const int64_t xs = (K + 63) / 64 * 64;
    Scratch<uint16_t> xp(M * xs);
    for (int64_t m = 0; m < M; ++m) permute_x(x + m * K, K, xp.data() + m * xs);
    const bool mx = bk == 32 && K % 32 == 0 && K > 32;
    if (M == 1 && (bk % 64 == 0 || bk >= K || mx)) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t g = 0; g < (N + NR - 1) / NR; ++g) {
            const int64_t n0 = g * NR, nr = N - n0 < NR ? N - n0 : NR;
            float out[NR];
            for (int64_t r = 0; r < nr; r += nr == NR ? NR : 1) {
                const uint8_t* rows = codes + (n0 + r) * K;
                if (nr == NR && mx) fp8_rows_bf16_mx<NR>(xp.data(), K, rows, sc, n0, bn, tables, out);
                else if (nr == NR) fp8_rows_bf16<NR>(xp.data(), K, rows, sc, n0, bn, bk, tables, out);
                else if (mx) fp8_rows_bf16_mx<1>(xp.data(), K, rows, sc, n0 + r, bn, tables, out + r);
                else fp8_rows_bf16<1>(xp.data(), K, rows, sc, n0 + r, bn, bk, tables, out + r);
            }
            for (int64_t r = 0; r < nr; ++r) y[n0 + r] = round_bf16(out[r]);
        }
        return true;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB];
        const uint8_t* row = codes + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const uint16_t* xm = xp.data() + m0 * xs;
            switch (mb) {
                case 1: fp8_row_bf16<1>(xm, xs, K, row, sc, n / bn, bk, tables, out); break;
                case 2: fp8_row_bf16<2>(xm, xs, K, row, sc, n / bn, bk, tables, out); break;
                case 3: fp8_row_bf16<3>(xm, xs, K, row, sc, n / bn, bk, tables, out); break;
                default: fp8_row_bf16<4>(xm, xs, K, row, sc, n / bn, bk, tables, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = round_bf16(out[i]);
        }
    }
    return true;
}

// Same shape for packed E2M1 with one E8M0 scale per 32 codes; four accumulators per row, one per 8 codes.
template <int R>
void mxfp4_row(const float* x, int64_t K, const uint8_t* row, const uint8_t* scales, float* out) {
    __m256 acc[R][4];
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 32; ++b) {
        __m256 w[4];
        decode_e2m1_32(row + b * 16, w);
        const __m256 sv = _mm256_set1_ps(e8m0_value(scales[b]) * 0.5f);
        for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(w[j], sv);
        for (int i = 0; i < R; ++i) {
            const float* xr = x + i * K + b * 32;
            for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr + 8 * j), acc[i][j]);
        }
    }
    for (int i = 0; i < R; ++i)
        out[i] = hsum(_mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3])));
}

// Generic kernel for any 8-, 6- or 4-bit element type, decoded through a table of its 256 (64, 16) values:
// HiF8, NVFP4 and others without a hand-written decoder. 8-bit codes use an AVX2 gather; 4-bit codes use two
// 8-entry vpermps lookups and a blend on the code's top bit. MX INT8 (BITS = 0 below) needs no table: its value
// is the two's complement integer times 2^-6, and the 2^-6 goes into the scale. Scales come as fp32 per block, or as byte
// codes decoded through their own table times a global factor (E8M0 for MX, E4M3 times the tensor scale for
// NVFP4). bk is a multiple of 16, or K itself.
struct LutScales {
    const float* f32;
    const uint8_t* codes;
    const float* table;
    float mul;
    int64_t cols;
    inline float at(int64_t rb, int64_t kb) const {
        return f32 ? f32[rb * cols + kb] : table[codes[rb * cols + kb]] * mul;
    }
};

// Code k of a packed row: bytes (8-bit, MX INT8), nibbles (4-bit, element 0 low), or 6-bit fields of 24-bit
// little-endian words (four codes per three bytes; see cumulo.formats.packing).
template <int BITS>
inline uint8_t code_at(const uint8_t* row, int64_t k) {
    if (BITS == 4) return k & 1 ? row[k / 2] >> 4 : row[k / 2] & 0xF;
    if (BITS == 6) {
        const uint8_t* q = row + k / 4 * 3;
        const uint32_t w = q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16;
        return (uint8_t)((w >> (6 * (k % 4))) & 63);
    }
    return row[k];
}

template <int BITS>
inline void decode_lut_16(const uint8_t* row, int64_t k, const float* lut, __m256 lut_lo, __m256 lut_hi,
                          __m256& w0, __m256& w1) {
    if (BITS == 0) {
        const __m128i b = _mm_loadu_si128((const __m128i*)(row + k));
        w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    } else if (BITS == 6) {  // four codes per 24-bit little-endian word; k is a multiple of 16 here
        alignas(32) float v[16];
        const uint8_t* q = row + k / 4 * 3;
        for (int g = 0; g < 4; ++g) {
            const uint32_t w = q[3 * g] | (uint32_t)q[3 * g + 1] << 8 | (uint32_t)q[3 * g + 2] << 16;
            for (int j = 0; j < 4; ++j) v[4 * g + j] = lut[(w >> (6 * j)) & 63];
        }
        w0 = _mm256_load_ps(v);
        w1 = _mm256_load_ps(v + 8);
    } else if (BITS == 8) {
        const __m128i b = _mm_loadu_si128((const __m128i*)(row + k));
        w0 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(b), 4);
        w1 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), 4);
    } else {
        const __m128i b = _mm_loadl_epi64((const __m128i*)(row + k / 2));
        const __m128i low = _mm_set1_epi8(0x0F);
        const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
        const __m256i i0 = _mm256_cvtepu8_epi32(nib), i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8));
        w0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, i0), _mm256_permutevar8x32_ps(lut_hi, i0),
                              _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
        w1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, i1), _mm256_permutevar8x32_ps(lut_hi, i1),
                              _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
    }
}

template <int BITS, int R>
void lut_row(const float* x, int64_t K, const uint8_t* row, const float* lut, const LutScales& sc, int64_t rb,
             int64_t bk, float* out) {
    const __m256 lut_lo = _mm256_loadu_ps(lut), lut_hi = _mm256_loadu_ps(lut + 8);
    __m256 acc[R][2];
    float tail[R];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps(), tail[i] = 0.0f;
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        const float s = sc.at(rb, kb);
        const __m256 sv = _mm256_set1_ps(BITS == 0 ? s * 0x1p-6f : s);
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
            __m256 w0, w1;
            decode_lut_16<BITS>(row, k, lut, lut_lo, lut_hi, w0, w1);
            w0 = _mm256_mul_ps(w0, sv);
            w1 = _mm256_mul_ps(w1, sv);
            for (int i = 0; i < R; ++i) {
                acc[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * K + k), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * K + k + 8), acc[i][1]);
            }
        }
        for (; k < k1; ++k) {
            const uint8_t c = code_at<BITS>(row, k);
            const float w = lut[c] * s;
            for (int i = 0; i < R; ++i) tail[i] += w * x[i * K + k];
        }
    }
    for (int i = 0; i < R; ++i) out[i] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) + tail[i];
}

template <int BITS>
void lut_linear(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const float* lut,
                const LutScales& sc, int64_t bn, int64_t bk, float* y, int nthreads) {
    const int64_t row_bytes = BITS == 4 ? (K + 1) / 2 : BITS == 6 ? 3 * ((K + 3) / 4) : K;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB];
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float* xm = x + m0 * K;
            const uint8_t* row = codes + n * row_bytes;
            switch (mb) {
                case 1: lut_row<BITS, 1>(xm, K, row, lut, sc, n / bn, bk, out); break;
                case 2: lut_row<BITS, 2>(xm, K, row, lut, sc, n / bn, bk, out); break;
                case 3: lut_row<BITS, 3>(xm, K, row, lut, sc, n / bn, bk, out); break;
                default: lut_row<BITS, 4>(xm, K, row, lut, sc, n / bn, bk, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
        }
    }
}

// MX INT8 on AVX-512: 16 codes widened to fp32 per step (value = code x 2^-6, folded into the block scale),
// products summed per block and the block's scale applied once; masked loads for tails.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void int8_row_512(const float* x, int64_t K,
                                                                        const uint8_t* row, const LutScales& sc,
                                                                        int64_t rb, int64_t bk, float* out) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        __m512 blk[R];
        for (int i = 0; i < R; ++i) blk[i] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 16) {
            _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T1);
            const __mmask16 m = k1 - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k1 - k)) - 1u);
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, row + k)));
            for (int i = 0; i < R; ++i)
                blk[i] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + i * K + k), blk[i]);
        }
        const __m512 s = _mm512_set1_ps(sc.at(rb, kb) * 0x1p-6f);
        for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(blk[i], s, acc[i]);
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

void int8_linear_512(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const LutScales& sc,
                     int64_t bn, int64_t bk, float* y, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB];
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float* xm = x + m0 * K;
            const uint8_t* row = codes + n * K;
            switch (mb) {
                case 1: int8_row_512<1>(xm, K, row, sc, n / bn, bk, out); break;
                case 2: int8_row_512<2>(xm, K, row, sc, n / bn, bk, out); break;
                case 3: int8_row_512<3>(xm, K, row, sc, n / bn, bk, out); break;
                default: int8_row_512<4>(xm, K, row, sc, n / bn, bk, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
        }
    }
}

// bf16 activations in and out (the engine's default dtype on CPUs with native bf16): x is widened to fp32 once
// per call and the fp32 results are rounded once to bf16 (nearest even), so the caller needs no conversions.
struct Bf16Io {
    Scratch<float> x32, y32;
    const float* x(const void* xin, int64_t n, bool bf16) {
        if (!bf16) return (const float*)xin;
        x32.resize(n);
        const uint16_t* h = (const uint16_t*)xin;
        for (int64_t i = 0; i < n; ++i) {
            const uint32_t u = (uint32_t)h[i] << 16;
            memcpy(&x32[i], &u, 4);
        }
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
        for (int64_t i = 0; i < n; ++i) {
            uint32_t u;
            memcpy(&u, &y32[i], 4);
            h[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)((u >> 16) | 0x40)
                                                     : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        }
    }
};

// Dequantizing into bf16, for prefill through torch's bf16 GEMM (several times its fp32 GEMM on CPUs with
// AVX512-BF16). 16 values per step, as fp32, times their block scale (one rounding), then rounded to bf16 as
// torch's .to(bfloat16) does: to nearest even, subnormals kept, NaN kept NaN. So the weights are bit-equal to the
// reference's bf16 dequantization, and exact wherever the scale is a power of two (E8M0), as E4M3 and E2M1 values
// are exact in bf16. The rounding is vcvtneps2bf16, which flushes subnormals: the rare step holding one rounds in
// integers instead.
#define CUMULO_DEQ __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// 16 E4M3 codes as fp32 times 2^-120: the sign to bit 31, exponent and mantissa to bits 26..20 (subnormals map
// to subnormals); codes 0x7F and 0xFF are NaN, as in the reference.
CUMULO_DEQ inline __m512 e4m3_16(const uint8_t* p, __mmask16 m) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p));
    const __m512i mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7F));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24);
    const __m512 v = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_slli_epi32(mag, 20)));
    return _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)), v,
                                _mm512_set1_ps(__builtin_nanf("")));
}

// 16 fp32 -> bf16 at out (the lanes in mask m): round to nearest even, NaN quieted, subnormals kept.
CUMULO_DEQ inline void store_bf16_16(uint16_t* out, __m512 v, __mmask16 m) {
    const __m512 mag = _mm512_abs_ps(v);
    const __mmask16 sub = _mm512_cmp_ps_mask(mag, _mm512_set1_ps(0x1p-126f), _CMP_LT_OQ) &
                          _mm512_cmp_ps_mask(mag, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    if (!sub) {
        _mm256_mask_storeu_epi16(out, m, (__m256i)_mm512_cvtneps_pbh(v));
        return;
    }
    const __m512i u = _mm512_castps_si512(v);  // the bit pattern, rounded in integers (no NaN can be here)
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    const __m512i fast = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v));
    _mm512_mask_cvtepi32_storeu_epi16(out, m, _mm512_mask_blend_epi32(sub, fast, rounded));
}

CUMULO_DEQ void fp8_dequant_bf16(const uint8_t* codes, int64_t N, int64_t K, const Scales& sc, int64_t bn,
                                 int64_t bk, uint16_t* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* row = codes + n * K;
        const int64_t rb = n / bn;
        for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, ++kb) {  // bk is K or a multiple of 16
            // 2^120 goes into the scale, one multiply, unless that overflows a finite scale (256 or more): then
            // onto the values first. Either way the product is the value times the scale, rounded once.
            const float s = sc.at(rb, kb), folded = s * 0x1p120f;
            const bool fold = __builtin_isfinite(folded) || !__builtin_isfinite(s);
            const __m512 first = _mm512_set1_ps(fold ? folded : 0x1p120f);
            const int64_t k1 = k0 + bk < K ? k0 + bk : K;
            for (int64_t k = k0; k < k1; k += 16) {
                const __mmask16 m = k1 - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k1 - k)) - 1u);
                __m512 v = _mm512_mul_ps(e4m3_16(row + k, m), first);
                if (!fold) v = _mm512_mul_ps(v, _mm512_set1_ps(s));
                store_bf16_16(out + n * K + k, v, m);
            }
        }
    }
}

// Packed E2M1 [N, K / 2] (element 0 in the low nibble) with E8M0 scales [N, K / 32], K % 32 == 0: a block of
// 32 is 16 bytes, whose nibbles are looked up in a 16-entry fp32 table and put back in element order.
CUMULO_DEQ void mxfp4_dequant_bf16(const uint8_t* codes, int64_t N, int64_t K, const uint8_t* scales,
                                   uint16_t* out, int nthreads) {
    const __m512 table = _mm512_loadu_ps(kE2M1);
    const __m512i even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < K / 32; ++b) {
            const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes + n * (K / 2) + b * 16)));
            const __m512 s = _mm512_set1_ps(e8m0_value(scales[n * (K / 32) + b]));
            const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)), table);
            const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
            const __m512 lo = _mm512_mul_ps(_mm512_permutex2var_ps(low, even, high), s);  // elements 0..15
            const __m512 hi = _mm512_mul_ps(_mm512_permutex2var_ps(low, odd, high), s);  // elements 16..31
            store_bf16_16(out + n * K + b * 32, lo, (__mmask16)0xFFFF);
            store_bf16_16(out + n * K + b * 32 + 16, hi, (__mmask16)0xFFFF);
        }
}

bool has_avx512_bf16() {
    return has_avx512() && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

}  // namespace

extern "C" {

// x [M, K] fp32; codes [N, K] bytes (bits = 8; bits = 0: MX INT8) or [N, ceil(K / 2)] packed nibbles,
// element 0 low (bits = 4);
// lut: 256 floats (value of each code); scales: fp32 [ceil(N / bn), ceil(K / bk)], or byte codes of that shape
// with scale_lut (256 floats) and scale_mul; y [M, N] fp32.
// x and y fp32, or bf16 with bf16 = 1 (see Bf16Io); wide_ok = 0 keeps MX INT8 on its AVX2 path (tests).
void cumulo_lut_linear(const void* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, int bits,
                       const float* lut, const float* scales_f32, const uint8_t* scale_codes,
                       const float* scale_lut, float scale_mul, int64_t bn, int64_t bk, void* y, int nthreads,
                       int bf16, int wide_ok) {
    const LutScales sc{scales_f32, scale_codes, scale_lut, scale_mul, (K + bk - 1) / bk};
    Bf16Io io;
    const float* xf = io.x(x, M * K, bf16);
    float* yf = io.y(y, M * N, bf16);
    if (bits == 0 && wide_ok && has_avx512()) int8_linear_512(xf, M, K, codes, N, sc, bn, bk, yf, nthreads);
    else if (bits == 0) lut_linear<0>(xf, M, K, codes, N, lut, sc, bn, bk, yf, nthreads);
    else if (bits == 8) lut_linear<8>(xf, M, K, codes, N, lut, sc, bn, bk, yf, nthreads);
    else if (bits == 6) lut_linear<6>(xf, M, K, codes, N, lut, sc, bn, bk, yf, nthreads);
    else lut_linear<4>(xf, M, K, codes, N, lut, sc, bn, bk, yf, nthreads);
    io.finish(y, M * N, bf16);
}

// The FP8 row kernels of both instruction sets behind one driver: rows of W split across threads, x taken MB
// rows at a time, the accumulator count C chosen by how the scale block divides into steps.
extern "C++" {
struct Fp8Avx512 {
    template <int R, int C>
    static void row(const float* x, int64_t K, const uint8_t* w, const Scales& sc, int64_t rb, int64_t bk,
                    float* out) {
        fp8_row_512<R, C>(x, K, w, sc, rb, bk, out);
    }
};
struct Fp8Avx2 {
    template <int R, int C>
    static void row(const float* x, int64_t K, const uint8_t* w, const Scales& sc, int64_t rb, int64_t bk,
                    float* out) {
        fp8_row<R, C>(x, K, w, sc, rb, bk, out);
    }
};

template <class Path>
void fp8_rows(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const Scales& sc,
              int64_t bn, int64_t bk, float* y, int nthreads) {
    const bool by64 = bk % 64 == 0, by32 = bk % 32 == 0;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB];
        const uint8_t* row = codes + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float* xm = x + m0 * K;
            switch (mb) {
                case 1:
                    if (by64) Path::template row<1, 4>(xm, K, row, sc, n / bn, bk, out);
                    else if (by32) Path::template row<1, 2>(xm, K, row, sc, n / bn, bk, out);
                    else Path::template row<1, 1>(xm, K, row, sc, n / bn, bk, out);
                    break;
                case 2:
                    if (by32) Path::template row<2, 2>(xm, K, row, sc, n / bn, bk, out);
                    else Path::template row<2, 1>(xm, K, row, sc, n / bn, bk, out);
                    break;
                case 3: Path::template row<3, 1>(xm, K, row, sc, n / bn, bk, out); break;
                default: Path::template row<4, 1>(xm, K, row, sc, n / bn, bk, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
        }
    }
}
}  // extern "C++"

// x [M, K] fp32; codes [N, K] E4M3; scales [ceil(N / bn), ceil(K / bk)] fp32 (scales_f32) or E8M0 bytes
// (scales_e8m0; pass the other as null); y [M, N] fp32. wide_ok = 0 keeps the AVX2 path (tests use it).
static void fp8_linear_f32(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
                    const float* scales_f32, const uint8_t* scales_e8m0, int64_t bn, int64_t bk, float* y,
                           int nthreads, int wide_ok) {
    const Scales sc{scales_f32, scales_e8m0, (K + bk - 1) / bk};
    if (wide_ok && has_avx512()) fp8_rows<Fp8Avx512>(x, M, K, codes, N, sc, bn, bk, y, nthreads);
    else fp8_rows<Fp8Avx2>(x, M, K, codes, N, sc, bn, bk, y, nthreads);
}

// x [M, K] fp32 with K % 32 == 0; codes [N, K / 2] packed E2M1; scales [N, K / 32] E8M0; y [M, N] fp32.
static void mxfp4_linear_f32(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
                             const uint8_t* scales, float* y, int nthreads) {
    const int64_t nb = K / 32;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* row = codes + n * (K / 2);
        const uint8_t* sc = scales + n * nb;
        float out[MB];
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float* xm = x + m0 * K;
            switch (mb) {
                case 1: mxfp4_row<1>(xm, K, row, sc, out); break;
                case 2: mxfp4_row<2>(xm, K, row, sc, out); break;
                case 3: mxfp4_row<3>(xm, K, row, sc, out); break;
                default: mxfp4_row<4>(xm, K, row, sc, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
        }
    }
}

// The entry points: x and y are fp32, or bf16 when bf16 = 1 (see Bf16Io).
void cumulo_fp8_linear(const void* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
                       const float* scales_f32, const uint8_t* scales_e8m0, int64_t bn, int64_t bk, void* y,
                       int nthreads, int wide_ok, int bf16) {
    if (bf16 && wide_ok && has_avx512_bf16_vbmi()) {
        const Scales sc{scales_f32, scales_e8m0, (K + bk - 1) / bk};
        if (fp8_linear_bf16((const uint16_t*)x, M, K, codes, N, sc, bn, bk, (uint16_t*)y, nthreads)) return;
    }
    Bf16Io io;
    const float* xf = io.x(x, M * K, bf16);
    float* yf = io.y(y, M * N, bf16);
    fp8_linear_f32(xf, M, K, codes, N, scales_f32, scales_e8m0, bn, bk, yf, nthreads, wide_ok);
    io.finish(y, M * N, bf16);
}

void cumulo_mxfp4_linear(const void* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
                         const uint8_t* scales, void* y, int nthreads, int bf16, int wide_ok) {
    if (bf16 && wide_ok && has_avx512_bf16_vbmi()) {
        mxfp4_linear_bf16((const uint16_t*)x, M, K, codes, N, scales, (uint16_t*)y, nthreads);
        return;
    }
    Bf16Io io;
    const float* xf = io.x(x, M * K, bf16);
    float* yf = io.y(y, M * N, bf16);
    mxfp4_linear_f32(xf, M, K, codes, N, scales, yf, nthreads);
    io.finish(y, M * N, bf16);
}

// Dequantize E4M3 codes [N, K] with block scales into fp32 [N, K] (the prefill path: then one sgemm).
void cumulo_fp8_dequant(const uint8_t* codes, int64_t N, int64_t K, const float* scales_f32,
                        const uint8_t* scales_e8m0, int64_t bn, int64_t bk, float* out, int nthreads) {
    const Scales sc{scales_f32, scales_e8m0, (K + bk - 1) / bk};
    float table[256];
    for (int c = 0; c < 256; ++c) table[c] = e4m3_value((uint8_t)c);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k0 = 0; k0 < K; k0 += bk) {
            const float s = sc.at(n / bn, k0 / bk);
            for (int64_t k = k0; k < k0 + bk && k < K; ++k) out[n * K + k] = table[codes[n * K + k]] * s;
        }
}

// Same for packed E2M1 [N, K / 2] with E8M0 scales [N, K / 32].
void cumulo_mxfp4_dequant(const uint8_t* codes, int64_t N, int64_t K, const uint8_t* scales, float* out,
                          int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
            const uint8_t byte = codes[n * (K / 2) + k / 2];
            out[n * K + k] = kE2M1[k & 1 ? byte >> 4 : byte & 0xF] * e8m0_value(scales[n * (K / 32) + k / 32]);
        }
}

// 1 where the CPU has what the bf16 dequantizers below need (AVX512-BF16 and VL).
int cumulo_dequant_bf16_runs(void) { return has_avx512_bf16() ? 1 : 0; }

// The same into bf16 [N, K], where the CPU has AVX512-BF16; 0 (nothing written) where it has not.
int cumulo_fp8_dequant_bf16(const uint8_t* codes, int64_t N, int64_t K, const float* scales_f32,
                            const uint8_t* scales_e8m0, int64_t bn, int64_t bk, uint16_t* out, int nthreads) {
    if (!has_avx512_bf16()) return 0;
    fp8_dequant_bf16(codes, N, K, Scales{scales_f32, scales_e8m0, (K + bk - 1) / bk}, bn, bk, out, nthreads);
    return 1;
}

int cumulo_mxfp4_dequant_bf16(const uint8_t* codes, int64_t N, int64_t K, const uint8_t* scales, uint16_t* out,
                              int nthreads) {
    if (!has_avx512_bf16() || K % 32) return 0;
    mxfp4_dequant_bf16(codes, N, K, scales, out, nthreads);
    return 1;
}

// The decode-graph forms (cumulo.platform.kernels.graph): one int64 array holding the arguments above in order
// (pointers as integers; the LUT kernel's scale_mul as an fp32 bit pattern).
void cumulo_fp8_linear_op(const int64_t* a) {
    cumulo_fp8_linear((const void*)a[0], a[1], a[2], (const uint8_t*)a[3], a[4], (const float*)a[5],
                      (const uint8_t*)a[6], a[7], a[8], (void*)a[9], (int)a[10], (int)a[11], (int)a[12]);
}

void cumulo_mxfp4_linear_op(const int64_t* a) {
    cumulo_mxfp4_linear((const void*)a[0], a[1], a[2], (const uint8_t*)a[3], a[4], (const uint8_t*)a[5],
                        (void*)a[6], (int)a[7], (int)a[8], (int)a[9]);
}

void cumulo_lut_linear_op(const int64_t* a) {
    const uint32_t bits = (uint32_t)a[10];
    float scale_mul;
    memcpy(&scale_mul, &bits, 4);
    cumulo_lut_linear((const void*)a[0], a[1], a[2], (const uint8_t*)a[3], a[4], (int)a[5], (const float*)a[6],
                      (const float*)a[7], (const uint8_t*)a[8], (const float*)a[9], scale_mul, a[11], a[12],
                      (void*)a[13], (int)a[14], (int)a[15], (int)a[16]);
}

// Other 8-bit elements through the FP8 bf16 kernel (codes looked up as exact bf16): HiF8 (sign-magnitude,
// its 128 magnitudes all fit bf16's 8 significant bits) and MX INT8 (twos = 1: two's complement, looked up by
// magnitude). mags: the value of each magnitude code; scales fp32 [ceil(N / bn), ceil(K / bk)] (scales_f32) or
// E8M0 bytes (scales_e8m0; pass the other as null). Returns 0 (nothing written) where this CPU lacks
// AVX512-BF16 + VBMI or the blocks are of a shape the kernel does not take; the caller then uses the LUT kernel.
int cumulo_table8_linear_bf16(const void* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
                              const float* scales_f32, const uint8_t* scales_e8m0, int64_t bn, int64_t bk, void* y,
                              int nthreads, const float* mags, int twos) {
    if (!has_avx512_bf16_vbmi()) return 0;
    const Scales sc{scales_f32, scales_e8m0, (K + bk - 1) / bk};
    const bool done = fp8_linear_bf16((const uint16_t*)x, M, K, codes, N, sc, bn, bk, (uint16_t*)y, nthreads, mags,
                                      twos != 0);
    return done ? 1 : 0;
}

// 1 where cumulo_table8_linear_bf16 runs for this K and column block (a decode graph records it then).
int cumulo_table8_runs(int64_t K, int64_t bk) {
    return has_avx512_bf16_vbmi() && (bk % 64 == 0 || bk >= K || ((bk == 16 || bk == 32) && K % bk == 0));
}

void cumulo_table8_linear_bf16_op(const int64_t* a) {
    cumulo_table8_linear_bf16((const void*)a[0], a[1], a[2], (const uint8_t*)a[3], a[4], (const float*)a[5],
                              (const uint8_t*)a[6], a[7], a[8], (void*)a[9], (int)a[10], (const float*)a[11],
                              (int)a[12]);
}

}  // extern "C"

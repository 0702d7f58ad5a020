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
#include <math.h>

namespace {

constexpr int MB = 4;  // rows of x handled per pass over a weight row

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
constexpr int kAhead = 4096;  // bytes of codes prefetched ahead of the loads

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
            _mm_prefetch((const char*)(row + k) + kAhead, _MM_HINT_T0);
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

// Generic kernel for any 8-bit or 4-bit element type, decoded through a table of its 256 (or 16) values:
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

template <int BITS>
inline void decode_lut_16(const uint8_t* row, int64_t k, const float* lut, __m256 lut_lo, __m256 lut_hi,
                          __m256& w0, __m256& w1) {
    if (BITS == 0) {
        const __m128i b = _mm_loadu_si128((const __m128i*)(row + k));
        w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
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
            const uint8_t c = BITS != 4 ? row[k] : (k & 1 ? row[k / 2] >> 4 : row[k / 2] & 0xF);
            const float w = lut[c] * s;
            for (int i = 0; i < R; ++i) tail[i] += w * x[i * K + k];
        }
    }
    for (int i = 0; i < R; ++i) out[i] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) + tail[i];
}

template <int BITS>
void lut_linear(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, const float* lut,
                const LutScales& sc, int64_t bn, int64_t bk, float* y, int nthreads) {
    const int64_t row_bytes = BITS != 4 ? K : (K + 1) / 2;
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

}  // namespace

extern "C" {

// x [M, K] fp32; codes [N, K] bytes (bits = 8; bits = 0: MX INT8) or [N, ceil(K / 2)] packed nibbles,
// element 0 low (bits = 4);
// lut: 256 floats (value of each code); scales: fp32 [ceil(N / bn), ceil(K / bk)], or byte codes of that shape
// with scale_lut (256 floats) and scale_mul; y [M, N] fp32.
void cumulo_lut_linear(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N, int bits,
                       const float* lut, const float* scales_f32, const uint8_t* scale_codes,
                       const float* scale_lut, float scale_mul, int64_t bn, int64_t bk, float* y, int nthreads) {
    const LutScales sc{scales_f32, scale_codes, scale_lut, scale_mul, (K + bk - 1) / bk};
    if (bits == 0) lut_linear<0>(x, M, K, codes, N, lut, sc, bn, bk, y, nthreads);
    else if (bits == 8) lut_linear<8>(x, M, K, codes, N, lut, sc, bn, bk, y, nthreads);
    else lut_linear<4>(x, M, K, codes, N, lut, sc, bn, bk, y, nthreads);
}

// x [M, K] fp32; codes [N, K] E4M3; scales [ceil(N / bn), ceil(K / bk)] fp32 (scales_f32) or E8M0 bytes
// (scales_e8m0; pass the other as null); y [M, N] fp32. wide_ok = 0 keeps the AVX2 path (tests use it).
void cumulo_fp8_linear(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
                       const float* scales_f32, const uint8_t* scales_e8m0, int64_t bn, int64_t bk,
                       float* y, int nthreads, int wide_ok) {
    const Scales sc{scales_f32, scales_e8m0, (K + bk - 1) / bk};
    if (wide_ok && has_avx512()) {
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
                        if (by64) fp8_row_512<1, 4>(xm, K, row, sc, n / bn, bk, out);
                        else if (by32) fp8_row_512<1, 2>(xm, K, row, sc, n / bn, bk, out);
                        else fp8_row_512<1, 1>(xm, K, row, sc, n / bn, bk, out);
                        break;
                    case 2:
                        if (by32) fp8_row_512<2, 2>(xm, K, row, sc, n / bn, bk, out);
                        else fp8_row_512<2, 1>(xm, K, row, sc, n / bn, bk, out);
                        break;
                    case 3: fp8_row_512<3, 1>(xm, K, row, sc, n / bn, bk, out); break;
                    default: fp8_row_512<4, 1>(xm, K, row, sc, n / bn, bk, out); break;
                }
                for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
            }
        }
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n) {
        float out[MB];
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float* xm = x + m0 * K;
            const uint8_t* row = codes + n * K;
            const bool by64 = bk % 64 == 0, by32 = bk % 32 == 0;
            switch (mb) {
                case 1:
                    if (by64) fp8_row<1, 4>(xm, K, row, sc, n / bn, bk, out);
                    else if (by32) fp8_row<1, 2>(xm, K, row, sc, n / bn, bk, out);
                    else fp8_row<1, 1>(xm, K, row, sc, n / bn, bk, out);
                    break;
                case 2:
                    if (by32) fp8_row<2, 2>(xm, K, row, sc, n / bn, bk, out);
                    else fp8_row<2, 1>(xm, K, row, sc, n / bn, bk, out);
                    break;
                case 3: fp8_row<3, 1>(xm, K, row, sc, n / bn, bk, out); break;
                default: fp8_row<4, 1>(xm, K, row, sc, n / bn, bk, out); break;
            }
            for (int64_t i = 0; i < mb; ++i) y[(m0 + i) * N + n] = out[i];
        }
    }
}

// x [M, K] fp32 with K % 32 == 0; codes [N, K / 2] packed E2M1; scales [N, K / 32] E8M0; y [M, N] fp32.
void cumulo_mxfp4_linear(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
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

// Dequantize E4M3 codes [N, K] with block scales into fp32 [N, K] (the prefill path: then one sgemm).
void cumulo_fp8_dequant(const uint8_t* codes, int64_t N, int64_t K, const float* scales_f32,
                        const uint8_t* scales_e8m0, int64_t bn, int64_t bk, float* out, int nthreads) {
    const Scales sc{scales_f32, scales_e8m0, (K + bk - 1) / bk};
    float table[256];
    for (int c = 0; c < 256; ++c) table[c] = e4m3_value((uint8_t)c);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) out[n * K + k] = table[codes[n * K + k]] * sc.at(n / bn, k / bk);
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

}  // extern "C"

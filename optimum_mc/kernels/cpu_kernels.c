/* Fast CPU kernels for optimum-mc's packed low-bit weights (layout: optimum_mc/packing.py, docs/format.md).
 *
 * Hand-written because no library reads our packed 1/2/3-bit layout (3-bit codes straddle int32 words). Plain C
 * (no torch headers, so it compiles in a second or two), built on first use by kernels/cpu.py, called via ctypes.
 *
 * Layout: the codes of one weight row form a little-endian bit stream; code i occupies stream bits
 * [i*b, (i+1)*b). A code q of group g dequantizes to (q - zero[g]) * scale[g] in fp32; scale/zero are fp16.
 *
 * Chunks: 8 consecutive codes take 8*b bits, i.e. exactly b bytes, so chunk c starts at byte b*c of the row for
 * every bit-width. For b <= 4 one 32-bit load at that byte, broadcast to 8 lanes, holds the whole chunk; lane l
 * keeps its code with a mask (after a shift by l*b, or, in the GEMV, without shifting: the lane then holds
 * q * 2^(l*b), and the matching x was pre-multiplied by 2^-(l*b), which is exact). Loads at the last chunk of a
 * row may read up to 3 bytes past it, so each kernel copies its own last row into a padded buffer first.
 *
 * GEMV (decode, few x rows): y[m,o] = sum_g scale[o,g] * (sum_{k in g} x[m,k] * q[o,k] - zero[o,g] * xsum[m,g]),
 * reading the packed bits (no dequantized copy) and reusing each decoded chunk for up to 4 rows of x.
 * Dequantize: evaluates (q - zero) * scale exactly as the reference does (-ffp-contract=off: no FMA contraction),
 * so results are bit-identical.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

/* Exact fp16 -> fp32 conversion (per group, so its cost is small next to the codes). */
static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0) {
        float f = (float)man * 5.9604644775390625e-08f; /* man * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
#endif
}

static inline uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Row o of the packed matrix, or a padded copy of it if it is the last row (loads may run 3 bytes past it). */
static inline const uint8_t *row_ptr(const uint8_t *base, int64_t o, int64_t rows, int64_t row_bytes, uint8_t *pad) {
    const uint8_t *row = base + o * row_bytes;
    if (o != rows - 1) return row;
    memcpy(pad, row, (size_t)row_bytes);
    return pad;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Dequantize: out[o, k] = (q[o, k] - zero[o, g]) * scale[o, g] in fp32.
 * ------------------------------------------------------------------------------------------------------------- */
static void dequantize_row(const uint8_t *row, const uint16_t *s16, const uint16_t *z16, float *dst, int64_t in_f,
                           int bits, int64_t group_size) {
    int64_t groups = in_f / group_size, chunks = group_size / 8;
    for (int64_t g = 0; g < groups; g++) {
        float s = half_to_float(s16[g]), z = half_to_float(z16[g]);
        const uint8_t *src = row + g * group_size * bits / 8;
        float *d = dst + g * group_size;
#ifdef __AVX2__
        __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
        if (bits == 8) {
            for (int64_t c = 0; c < chunks; c++) {
                __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + 8 * c)));
                _mm256_storeu_ps(d + 8 * c, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), vz), vs));
            }
        } else {
            __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
            __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
            for (int64_t c = 0; c < chunks; c++) {
                __m256i v = _mm256_set1_epi32((int)load_u32(src + bits * c));
                __m256i q = _mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask);
                _mm256_storeu_ps(d + 8 * c, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), vz), vs));
            }
        }
#else
        uint32_t mask = (1u << bits) - 1u;
        for (int64_t c = 0; c < chunks; c++) {
            uint64_t v = 0;
            memcpy(&v, src + bits * c, (size_t)bits);
            for (int l = 0; l < 8; l++) {
                float q = (float)((uint32_t)(v >> (l * bits)) & mask);
                float diff = q - z;
                d[8 * c + l] = diff * s;
            }
        }
#endif
    }
}

/* Returns 0, or -1 when out of memory. */
int mc_dequantize(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, float *out, int64_t rows,
                  int64_t in_f, int bits, int64_t group_size, int threads) {
    int64_t row_bytes = in_f * bits / 8, groups = in_f / group_size;
    uint8_t *pad = (uint8_t *)malloc((size_t)row_bytes + 8);
    if (pad == NULL) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * in_f >= (1 << 18))
    for (int64_t o = 0; o < rows; o++) {
        const uint8_t *row = row_ptr(qweight, o, rows, row_bytes, pad);
        dequantize_row(row, scales + o * groups, zeros + o * groups, out + o * in_f, in_f, bits, group_size);
    }
    free(pad);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * GEMV: y[m, o] = sum_k x[m, k] * W[o, k] for m < M (a few rows), reading the packed codes directly.
 *
 * xs holds x re-laid so that chunk c of row m multiplies xs[m*in_f + 8c .. 8c+7] (see prepare_x).
 * ------------------------------------------------------------------------------------------------------------- */

#ifndef GEMV_PREFETCH
/* bytes ahead in the code stream that the GEMV prefetches: the codes stream from memory, and without a prefetch
 * the loads wait on it (1.4-2x slower measured on Mixtral's expert shapes) */
#define GEMV_PREFETCH 2048
#endif

#ifdef __AVX2__
#define PRESCALE_MAX_BITS 3 /* the AVX2 GEMV leaves 1-3 bit codes unshifted in their lanes */
#else
#define PRESCALE_MAX_BITS 0
#endif

/* xs = x with lane l of each chunk scaled by 2^-(l*b) where codes stay unshifted, else x; xsum = per-group sums. */
static void prepare_x(const float *x, float *xs, float *xsum, int64_t M, int64_t in_f, int bits, int64_t group_size) {
    int64_t groups = in_f / group_size;
    float f[8];
    for (int l = 0; l < 8; l++) f[l] = bits <= PRESCALE_MAX_BITS ? (float)(1.0 / (double)(1u << (l * bits))) : 1.0f;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * in_f;
        float *dst = xs + m * in_f;
        for (int64_t k = 0; k < in_f; k++) dst[k] = xm[k] * f[k & 7];
        for (int64_t g = 0; g < groups; g++) {
            float acc = 0.0f;
            for (int64_t k = g * group_size; k < (g + 1) * group_size; k++) acc += xm[k];
            xsum[m * groups + g] = acc;
        }
    }
}

#ifdef __AVX2__
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One chunk of 8 codes as floats: q * 2^(l*b) for b <= 3, q for b = 4 and 8. */
static inline __attribute__((always_inline)) __m256 decode_chunk(const uint8_t *src, int64_t c, const int BITS) {
    if (BITS == 8) {
        __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + 8 * c)));
        return _mm256_cvtepi32_ps(q);
    }
    __m256i v = _mm256_set1_epi32((int)load_u32(src + BITS * c));
    if (BITS == 4) {
        v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    }
    const int mk = (1 << BITS) - 1;
    __m256i mask = _mm256_setr_epi32(mk, mk << BITS, mk << (2 * BITS), mk << (3 * BITS), mk << (4 * BITS),
                                     mk << (5 * BITS), mk << (6 * BITS), mk << (7 * BITS));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
}

/* All M (<= 4) outputs of one weight row. */
static inline __attribute__((always_inline)) void gemv_row(const uint8_t *row, const uint16_t *s16,
                                                           const uint16_t *z16, const float *xs, const float *xsum,
                                                           float *y, int64_t out_f, int64_t in_f, int64_t groups,
                                                           int64_t group_size, const int BITS, const int M) {
    const int U = M == 1 ? 4 : M == 2 ? 2 : 1; /* independent accumulators per x row: hide the FMA latency */
    int64_t chunks = group_size / 8;
    __m256 tot[4];
    float corr[4];
    for (int m = 0; m < M; m++) {
        tot[m] = _mm256_setzero_ps();
        corr[m] = 0.0f;
    }
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *src = row + g * group_size * BITS / 8;
        const float *xg = xs + g * group_size;
        _mm_prefetch((const char *)src + GEMV_PREFETCH, _MM_HINT_T0);
        __m256 acc[4][4];
        for (int m = 0; m < M; m++)
            for (int u = 0; u < U; u++) acc[m][u] = _mm256_setzero_ps();
        for (int64_t c = 0; c < chunks; c += U) {
            for (int u = 0; u < U; u++) {
                __m256 q = decode_chunk(src, c + u, BITS);
                for (int m = 0; m < M; m++)
                    acc[m][u] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xg + m * in_f + 8 * (c + u)), acc[m][u]);
            }
        }
        float s = half_to_float(s16[g]), z = half_to_float(z16[g]);
        __m256 vs = _mm256_set1_ps(s);
        for (int m = 0; m < M; m++) {
            __m256 a = acc[m][0];
            for (int u = 1; u < U; u++) a = _mm256_add_ps(a, acc[m][u]);
            tot[m] = _mm256_fmadd_ps(a, vs, tot[m]);
            corr[m] += s * z * xsum[m * groups + g];
        }
    }
    for (int m = 0; m < M; m++) y[m * out_f] = hsum256(tot[m]) - corr[m];
}
#else
static inline void gemv_row(const uint8_t *row, const uint16_t *s16, const uint16_t *z16, const float *xs,
                            const float *xsum, float *y, int64_t out_f, int64_t in_f, int64_t groups,
                            int64_t group_size, const int BITS, const int M) {
    /* portable path: 8 lanes of plain C that compilers vectorize (SSE2, NEON); codes are shifted down */
    uint32_t mask = (1u << BITS) - 1u;
    for (int m = 0; m < M; m++) {
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *src = row + g * group_size * BITS / 8;
            const float *xg = xs + m * in_f + g * group_size;
            float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t c = 0; c < group_size / 8; c++) {
                uint64_t v = 0;
                memcpy(&v, src + BITS * c, (size_t)BITS);
                for (int l = 0; l < 8; l++) acc[l] += (float)((uint32_t)(v >> (l * BITS)) & mask) * xg[8 * c + l];
            }
            float dot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            float s = half_to_float(s16[g]), z = half_to_float(z16[g]);
            total += s * (dot - z * xsum[m * groups + g]);
        }
        y[m * out_f] = total;
    }
}
#endif

typedef struct {
    const uint8_t *qweight;
    const uint16_t *scales, *zeros;
    const float *xs, *xsum;
    float *y;
    int64_t out_f, in_f, group_size;
    uint8_t *pad;
} gemv_args;

typedef void (*gemv_range_fn)(const gemv_args *a, int64_t begin, int64_t end);

/* Rows [begin, end) for a compile-time bit-width and x-row count (one function each, so both are constants). */
#define GEMV_RANGE(BITS, M)                                                                                         \
    static void gemv_range_##BITS##_##M(const gemv_args *a, int64_t begin, int64_t end) {                           \
        int64_t row_bytes = a->in_f * BITS / 8, groups = a->in_f / a->group_size;                                   \
        for (int64_t o = begin; o < end; o++) {                                                                     \
            const uint8_t *row = row_ptr(a->qweight, o, a->out_f, row_bytes, a->pad);                               \
            gemv_row(row, a->scales + o * groups, a->zeros + o * groups, a->xs, a->xsum, a->y + o, a->out_f,        \
                     a->in_f, groups, a->group_size, BITS, M);                                                      \
        }                                                                                                           \
    }
#define GEMV_RANGES(BITS) GEMV_RANGE(BITS, 1) GEMV_RANGE(BITS, 2) GEMV_RANGE(BITS, 3) GEMV_RANGE(BITS, 4)
GEMV_RANGES(1)
GEMV_RANGES(2)
GEMV_RANGES(3)
GEMV_RANGES(4)
GEMV_RANGES(8)

static gemv_range_fn gemv_range(int bits, int64_t M) {
#define GEMV_PICK(BITS)                                                                                             \
    case BITS: return M == 1 ? gemv_range_##BITS##_1 : M == 2 ? gemv_range_##BITS##_2                              \
                    : M == 3 ? gemv_range_##BITS##_3 : gemv_range_##BITS##_4;
    switch (bits) {
        GEMV_PICK(1)
        GEMV_PICK(2)
        GEMV_PICK(3)
        GEMV_PICK(4)
        GEMV_PICK(8)
        default: return NULL;
    }
#undef GEMV_PICK
}

/* Static partition of the output rows over threads, in blocks of 4 rows. */
static void parallel_rows(gemv_range_fn fn, const gemv_args *a, int threads, int64_t work) {
    int64_t blocks = (a->out_f + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && work >= (1 << 19))
    for (int64_t b = 0; b < blocks; b++) {
        int64_t end = 4 * b + 4 < a->out_f ? 4 * b + 4 : a->out_f;
        fn(a, 4 * b, end);
    }
}

/* y (M, out_f) = x (M, in_f) @ W.T; returns 0, -1 for bad arguments (bits, M), -2 when out of memory. */
static int gemv_fma(const float *x, const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, float *y,
                    int64_t M, int64_t out_f, int64_t in_f, int bits, int64_t group_size, int threads) {
    if (M < 1 || gemv_range(bits, 1) == NULL) return -1;
    int64_t groups = in_f / group_size, row_bytes = in_f * bits / 8;
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * in_f));
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(M * groups));
    uint8_t *pad = (uint8_t *)malloc((size_t)row_bytes + 8);
    int rc = (xs == NULL || xsum == NULL || pad == NULL) ? -2 : 0;
    if (rc == 0) {
        prepare_x(x, xs, xsum, M, in_f, bits, group_size);
        for (int64_t m0 = 0; m0 < M; m0 += 4) { /* four x rows per pass over the weights */
            int64_t mm = M - m0 < 4 ? M - m0 : 4;
            gemv_args a = {qweight, scales, zeros, xs + m0 * in_f, xsum + m0 * groups, y + m0 * out_f,
                           out_f,   in_f,   group_size, pad};
            parallel_rows(gemv_range(bits, mm), &a, threads, out_f * in_f * mm);
        }
    }
    free(pad);
    free(xs);
    free(xsum);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Dequantize to bf16 (round to nearest even, like torch's cast): the prefill path feeds bf16 BLAS with it.
 * ------------------------------------------------------------------------------------------------------------- */
/* n floats to bf16, round to nearest even (NaN stays NaN); branch-free so the compiler vectorizes it. */
static void floats_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    int64_t k = 0;
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    for (; k + 8 <= n; k += 8) { /* hardware round-to-nearest-even conversion */
        __m128bh v = _mm256_cvtneps_pbh(_mm256_loadu_ps(src + k));
        _mm_storeu_si128((__m128i *)(dst + k), (__m128i)v);
    }
#endif
    for (; k < n; k++) {
        uint32_t u;
        memcpy(&u, &src[k], 4);
        uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        uint32_t quiet = (u >> 16) | 0x40u;
        dst[k] = (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet : rounded);
    }
}

/* Returns 0, or -1 when out of memory. */
int mc_dequantize_bf16(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, uint16_t *out,
                       int64_t rows, int64_t in_f, int bits, int64_t group_size, int threads) {
    int64_t row_bytes = in_f * bits / 8, groups = in_f / group_size;
    uint8_t *pad = (uint8_t *)malloc((size_t)row_bytes + 8);
    if (pad == NULL) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && rows * in_f >= (1 << 18))
    {
        /* a few rows at a time through an fp32 buffer that stays in L1/L2, then converted */
        const int64_t chunk_rows = in_f >= 4096 ? 1 : 4096 / in_f;
        float *tmp = (float *)malloc(sizeof(float) * (size_t)(in_f * chunk_rows));
        if (tmp == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t c0 = 0; c0 < rows; c0 += chunk_rows) {
            if (tmp == NULL) continue;
            int64_t c1 = c0 + chunk_rows < rows ? c0 + chunk_rows : rows;
            for (int64_t o = c0; o < c1; o++) {
                const uint8_t *row = row_ptr(qweight, o, rows, row_bytes, pad);
                dequantize_row(row, scales + o * groups, zeros + o * groups, tmp + (o - c0) * in_f, in_f, bits,
                               group_size);
            }
            floats_to_bf16(tmp, out + c0 * in_f, (c1 - c0) * in_f);
        }
        free(tmp);
    }
    free(pad);
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Integer-dot GEMVs (hand-written for the same reason as the rest of this file: no library reads the packed
 * 1/2/3-bit layout). x is cut into groups (the weight's groups); each group gets a scale sx = max|x| / 127 and
 * int8 "limbs":
 *   - int8 activations (opt-in, decode only: decode_activations = "int8"): one limb, x ~= sx * xq with
 *     xq = rint(x * 127 / max|x|), as llama.cpp does for its k-quants;
 *   - fp32 decode (the default where the vector kernel exists): x / sx = l0 + l1 / 2^7 + l2 / 2^14 (+ l3 / 2^21),
 *     each limb the rounded remainder of the previous one, so the representation error is at most
 *     2^-22 * max|x| per element with three limbs, 2^-29 with four (the fourth is used for a group whose
 *     max|x| exceeds 8x its mean |x|, where three could let the error approach the fp32 tolerance).
 *   Then per group  y += scale * sx * (sum_l 2^(-7l) * sum_k q[k] * l_l[k])  -  scale * zero * sum_k x[k],  with
 *   exact integer dots (the last sum is sx * sum(xq) for int8, the fp32 sum of x for limbs).
 * With AVX512-VBMI + VNNI, 64 codes become 64 bytes in three instructions (byte permute, multishift, mask) and one
 * vpdpbusd per limb multiplies them with 64 int8 values: one limb ~2x and three ~1.5x fewer cycles than the fp32
 * FMA GEMV above, whose int->float conversion and FMA per 8 codes bound it. A portable loop computes the int8
 * sums elsewhere; fp32 decode there keeps the FMA GEMV.
 * ------------------------------------------------------------------------------------------------------------- */
#include <math.h>

#ifndef LIMB_OUTLIER
#define LIMB_OUTLIER 8.0f /* max|x| / mean|x| of a group above which fp32 decode takes a fourth limb */
#endif

/* limbs 1: xq (M, in_f) int8, xqsf = sx * (sum of the group's xq). limbs 4: xq holds 4 limb planes of
 * limb_stride bytes each, xqsf = the fp32 sum of x, nlimb (M, groups) = 3 or 4. A group holding a NaN or an
 * infinity gets sx = NaN, so the output is NaN as the FMA path's would be, never a silent number; a group whose
 * max|x| is 0 (or below 2^-126, where 127 / max|x| would overflow) contributes 0. */
static void prepare_x_i8(const float *x, int8_t *xq, float *sx, float *xqsf, uint8_t *nlimb, int64_t M, int64_t in_f,
                         int64_t group_size, int limbs, int64_t limb_stride) {
    int64_t groups = in_f / group_size;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + m * in_f + g * group_size;
            int64_t off = m * in_f + g * group_size, mg = m * groups + g;
            float amax = 0.0f, asum = 0.0f, xsum = 0.0f;
            int finite = 1;
            for (int64_t k = 0; k < group_size; k++) {
                amax = fmaxf(amax, fabsf(xg[k]));
                asum += fabsf(xg[k]);
                xsum += xg[k];
                finite &= isfinite(xg[k]) ? 1 : 0;
            }
            int usable = finite && amax >= 1.17549435e-38f;
            float inv = usable ? 127.0f / amax : 0.0f;
            int32_t sum = 0;
            for (int64_t k = 0; k < group_size; k++) {
                float t = usable ? xg[k] * inv : 0.0f, v = nearbyintf(t); /* never cast a NaN to an integer */
                xq[off + k] = (int8_t)v;
                sum += (int32_t)v;
                for (int l = 1; l < limbs; l++) { /* the remainder is exact in fp32; times 128 too */
                    t = (t - v) * 128.0f;
                    v = nearbyintf(t);
                    xq[l * limb_stride + off + k] = (int8_t)v;
                }
            }
            sx[mg] = !finite ? NAN : usable ? amax / 127.0f : 0.0f;
            if (limbs == 1) {
                xqsf[mg] = sx[mg] * (float)sum;
            } else {
                xqsf[mg] = usable ? xsum : (finite ? 0.0f : NAN);
                nlimb[mg] = amax > LIMB_OUTLIER * (asum / (float)group_size) ? 4 : 3;
            }
        }
}

typedef struct {
    const uint8_t *qweight;
    const uint16_t *scales, *zeros;
    const int8_t *xq; /* limb 0; limb l at xq + l * limb_stride */
    const float *sx, *xqsf;
    float *y;
    int64_t out_f, in_f, group_size;
    float *fr; /* scratch of M * groups floats: scale * sx of one weight row */
    const uint8_t *nlimb; /* limbs per (x row, group) for fp32 decode; unused for int8 */
    int64_t limb_stride;
} i8_args;

typedef void (*i8_range_fn)(const i8_args *a, int64_t begin, int64_t end);

/* Portable: code k of a row read from the 1-2 bytes holding it (never past the row). */
static inline uint32_t code_at(const uint8_t *row, int64_t k, int bits) {
    int64_t bit = k * bits, byte = bit >> 3;
    uint32_t v = row[byte];
    if ((bit & 7) + bits > 8) v |= (uint32_t)row[byte + 1] << 8;
    return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

static void i8_range_portable(const i8_args *a, int64_t begin, int64_t end, int bits, int M) {
    int64_t groups = a->in_f / a->group_size, row_bytes = a->in_f * bits / 8;
    for (int64_t o = begin; o < end; o++) {
        const uint8_t *row = a->qweight + o * row_bytes;
        for (int m = 0; m < M; m++) {
            float tot = 0.0f, corr = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                const int8_t *xg = a->xq + m * a->in_f + g * a->group_size;
                int32_t dot = 0;
                for (int64_t k = 0; k < a->group_size; k++) dot += (int32_t)code_at(row, g * a->group_size + k, bits) * xg[k];
                float f = half_to_float(a->scales[o * groups + g]) * a->sx[m * groups + g];
                tot += (float)dot * f;
                corr += half_to_float(a->scales[o * groups + g]) * half_to_float(a->zeros[o * groups + g]) *
                        a->xqsf[m * groups + g];
            }
            a->y[m * a->out_f + o] = tot - corr;
        }
    }
}

#define I8_PORTABLE(BITS, M)                                                                                        \
    static void i8p_##BITS##_##M(const i8_args *a, int64_t b, int64_t e) { i8_range_portable(a, b, e, BITS, M); }
#define I8_PORTABLES(BITS) I8_PORTABLE(BITS, 1) I8_PORTABLE(BITS, 2) I8_PORTABLE(BITS, 3) I8_PORTABLE(BITS, 4)
I8_PORTABLES(1)
I8_PORTABLES(2)
I8_PORTABLES(3)
I8_PORTABLES(4)
I8_PORTABLES(8)

#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define MC_HAVE_I8DOT 1
/* 64 consecutive codes (8 * BITS bytes at src, read with a masked load: never past them) as 64 bytes. Byte t of
 * qword j takes code 8j + t: the byte permute puts the BITS bytes holding codes 8j..8j+7 at the start of qword j,
 * the multishift takes 8 bits from bit BITS * t of it, the mask keeps the code. */
typedef struct {
    __m512i perm, ctl, mask;
} codes64_consts;

static codes64_consts codes64_init(int bits) {
    int8_t perm[64], ctl[64];
    for (int j = 0; j < 8; j++)
        for (int t = 0; t < 8; t++) {
            perm[8 * j + t] = (int8_t)(bits * j + (t < bits ? t : 0));
            ctl[8 * j + t] = (int8_t)(bits * t);
        }
    codes64_consts c = {_mm512_loadu_si512(perm), _mm512_loadu_si512(ctl), _mm512_set1_epi8((char)((1 << bits) - 1))};
    return c;
}

static inline __attribute__((always_inline)) __m512i codes64(const uint8_t *src, const codes64_consts *c,
                                                             const int BITS) {
    if (BITS == 8) return _mm512_loadu_si512((const void *)src);
    __m512i v = _mm512_maskz_loadu_epi8((__mmask64)((1ULL << (8 * BITS)) - 1), src);
    v = _mm512_permutexvar_epi8(c->perm, v);
    v = _mm512_multishift_epi64_epi8(c->ctl, v);
    return _mm512_and_si512(v, c->mask);
}

/* Per weight row: fr[m, g] = scale[g] * sx[m, g] and the zero-point term sum_g scale * zero * xqsf, 16 groups
 * per vector; then per group the integer dots (one per limb), their conversion and one FMA. LIMBS: 1 (int8) or 3
 * (fp32 decode: three limbs, a fourth where nlimb says so). */
static inline __attribute__((always_inline)) void i8_rows(const i8_args *a, int64_t begin, int64_t end,
                                                          const int BITS, const int M, const int LIMBS) {
    int64_t groups = a->in_f / a->group_size, blocks = a->group_size / 64, row_bytes = a->in_f * BITS / 8;
    int64_t ls = a->limb_stride;
    /* a lane sums 4 * blocks products of a code and a limb in [-64, 64]: times 128 that stays below 2^31 while
     * blocks * max_code < 2^16 (any group of up to 16384 codes) */
    const int pack12 = blocks * ((1 << BITS) - 1) < 65536;
    const codes64_consts cc = codes64_init(BITS);
    float *fr = a->fr;
    for (int64_t o = begin; o < end; o++) {
        const uint8_t *row = a->qweight + o * row_bytes;
        const uint16_t *s16 = a->scales + o * groups, *z16 = a->zeros + o * groups;
        __m512 tot[4][2];
        float corr[4];
        for (int m = 0; m < M; m++) {
            const float *sx = a->sx + m * groups, *xqsf = a->xqsf + m * groups;
            __m512 cv = _mm512_setzero_ps();
            int64_t g = 0;
            for (; g + 16 <= groups; g += 16) {
                __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s16 + g)));
                __m512 zv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(z16 + g)));
                _mm512_storeu_ps(fr + m * groups + g, _mm512_mul_ps(sv, _mm512_loadu_ps(sx + g)));
                cv = _mm512_fmadd_ps(_mm512_mul_ps(sv, zv), _mm512_loadu_ps(xqsf + g), cv);
            }
            corr[m] = _mm512_reduce_add_ps(cv);
            for (; g < groups; g++) {
                float s = half_to_float(s16[g]);
                fr[m * groups + g] = s * sx[g];
                corr[m] += s * half_to_float(z16[g]) * xqsf[g];
            }
            tot[m][0] = tot[m][1] = _mm512_setzero_ps();
        }
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *src = row + g * a->group_size * BITS / 8;
            _mm_prefetch((const char *)src + GEMV_PREFETCH, _MM_HINT_T0);
            __m512i acc[4][4];
            int four[4];
            for (int m = 0; m < M; m++) {
                four[m] = LIMBS > 1 && a->nlimb[m * groups + g] == 4;
                for (int l = 0; l < 4; l++) acc[m][l] = _mm512_setzero_si512();
            }
            for (int64_t b = 0; b < blocks; b++) {
                __m512i q = codes64(src + b * 8 * BITS, &cc, BITS);
                for (int m = 0; m < M; m++) {
                    const int8_t *xl = a->xq + m * a->in_f + g * a->group_size + 64 * b;
                    for (int l = 0; l < LIMBS; l++)
                        acc[m][l] = _mm512_dpbusd_epi32(acc[m][l], q, _mm512_loadu_si512((const void *)(xl + l * ls)));
                    if (LIMBS > 1 && four[m])
                        acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], q, _mm512_loadu_si512((const void *)(xl + 3 * ls)));
                }
            }
            /* two accumulators, alternating by group, hide the FMA latency (lane sums < 2^24: exact in fp32) */
            for (int m = 0; m < M; m++) {
                __m512 d = _mm512_cvtepi32_ps(acc[m][0]);
                if (LIMBS > 1) {
                    __m512 low;
                    if (pack12) { /* 128 * l1-sum + l2-sum in int32: one conversion instead of two */
                        __m512i l12 = _mm512_add_epi32(_mm512_slli_epi32(acc[m][1], 7), acc[m][2]);
                        low = _mm512_mul_ps(_mm512_cvtepi32_ps(l12), _mm512_set1_ps(1.0f / 16384.0f));
                    } else {
                        low = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][2]), _mm512_set1_ps(1.0f / 16384.0f),
                                              _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m][1]), _mm512_set1_ps(1.0f / 128.0f)));
                    }
                    if (four[m])
                        low = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][3]), _mm512_set1_ps(1.0f / 2097152.0f), low);
                    d = _mm512_add_ps(d, low);
                }
                tot[m][g & 1] = _mm512_fmadd_ps(d, _mm512_set1_ps(fr[m * groups + g]), tot[m][g & 1]);
            }
        }
        for (int m = 0; m < M; m++)
            a->y[m * a->out_f + o] = _mm512_reduce_add_ps(_mm512_add_ps(tot[m][0], tot[m][1])) - corr[m];
    }
}

#define I8_FAST(BITS, M)                                                                                            \
    static void i8f_##BITS##_##M(const i8_args *a, int64_t b, int64_t e) { i8_rows(a, b, e, BITS, M, 1); }       \
    static void lmb_##BITS##_##M(const i8_args *a, int64_t b, int64_t e) { i8_rows(a, b, e, BITS, M, 3); }
#define I8_FASTS(BITS) I8_FAST(BITS, 1) I8_FAST(BITS, 2) I8_FAST(BITS, 3) I8_FAST(BITS, 4)
I8_FASTS(1)
I8_FASTS(2)
I8_FASTS(3)
I8_FASTS(4)
I8_FASTS(8)
#endif

/* The integer-dot GEMV for a bit-width, x-row count (<= 4) and limb count (1: int8 activations, 4: fp32 decode),
 * or NULL. The vector kernels need groups of whole 64-code blocks; int8 has a portable fallback, fp32 decode
 * does not (the FMA GEMV serves it). */
static i8_range_fn i8_range(int bits, int64_t M, int64_t group_size, int limbs) {
#ifdef MC_HAVE_I8DOT
    if (group_size % 64 == 0) {
#define I8_PICK_F(BITS, P)                                                                                          \
    case BITS: return M == 1 ? P##_##BITS##_1 : M == 2 ? P##_##BITS##_2 : M == 3 ? P##_##BITS##_3 : P##_##BITS##_4;
        if (limbs == 1) {
            switch (bits) {
                I8_PICK_F(1, i8f)
                I8_PICK_F(2, i8f)
                I8_PICK_F(3, i8f)
                I8_PICK_F(4, i8f)
                I8_PICK_F(8, i8f)
                default: return NULL;
            }
        }
        switch (bits) {
            I8_PICK_F(1, lmb)
            I8_PICK_F(2, lmb)
            I8_PICK_F(3, lmb)
            I8_PICK_F(4, lmb)
            I8_PICK_F(8, lmb)
            default: return NULL;
        }
#undef I8_PICK_F
    }
#endif
    (void)group_size;
    if (limbs != 1) return NULL;
#define I8_PICK_P(BITS)                                                                                             \
    case BITS: return M == 1 ? i8p_##BITS##_1 : M == 2 ? i8p_##BITS##_2 : M == 3 ? i8p_##BITS##_3 : i8p_##BITS##_4;
    switch (bits) {
        I8_PICK_P(1)
        I8_PICK_P(2)
        I8_PICK_P(3)
        I8_PICK_P(4)
        I8_PICK_P(8)
        default: return NULL;
    }
#undef I8_PICK_P
}

/* Buffers of the integer-dot GEMVs for P rows of x: limb planes, group scales, zero-point sums, limb counts, in
 * one allocation (a decode call is a few microseconds: one malloc, not four). */
typedef struct {
    int8_t *xq;
    float *sx, *xqsf;
    uint8_t *nlimb;
    int64_t limb_stride;
    void *block;
} int_x;

static int int_x_alloc(int_x *b, int64_t P, int64_t in_f, int64_t groups, int limbs) {
    size_t nf = (size_t)(P * groups), nq = (size_t)(limbs * P * in_f);
    b->limb_stride = P * in_f;
    b->block = malloc(sizeof(float) * 2 * nf + nq + nf);
    if (b->block == NULL) return -2;
    b->sx = (float *)b->block;
    b->xqsf = b->sx + nf;
    b->xq = (int8_t *)(b->xqsf + nf);
    b->nlimb = (uint8_t *)(b->xq + nq);
    return 0;
}

static void int_x_free(int_x *b) { free(b->block); }

/* Rows r.. of the prepared x for a GEMV call on output rows of one matrix. */
static i8_args int_x_args(const int_x *b, int64_t r, const uint8_t *qw, const uint16_t *sc, const uint16_t *zr,
                          float *y, int64_t out_f, int64_t in_f, int64_t group_size, float *fr) {
    int64_t groups = in_f / group_size;
    i8_args a = {qw,     sc,    zr,         b->xq + r * in_f, b->sx + r * groups, b->xqsf + r * groups,
                 y,      out_f, in_f,       group_size,       fr,                 b->nlimb + r * groups,
                 b->limb_stride};
    return a;
}

/* y (M, out_f) = x (M, in_f) @ W.T by integer dots with `limbs` (1: int8 activations, 4: fp32 decode); returns 0,
 * -1 for bad arguments, -2 when out of memory. Rows of W in blocks of 64 over the threads, each with its own
 * scratch. */
/* Output rows [64 * b0, 64 * b1) of gemv_int for all rows of x, with the scratch fr (4 * groups floats). */
static void gemv_int_blocks(const int_x *bx, const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros,
                            float *y, int64_t M, int64_t out_f, int64_t in_f, int bits, int64_t group_size, int limbs,
                            float *fr, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t begin = 64 * b, end = begin + 64 < out_f ? begin + 64 : out_f;
        for (int64_t m0 = 0; m0 < M; m0 += 4) { /* four x rows per pass over the weights */
            int64_t mm = M - m0 < 4 ? M - m0 : 4;
            i8_args a = int_x_args(bx, m0, qweight, scales, zeros, y + m0 * out_f, out_f, in_f, group_size, fr);
            i8_range(bits, mm, group_size, limbs)(&a, begin, end);
        }
    }
}

static int gemv_int(const float *x, const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, float *y,
                    int64_t M, int64_t out_f, int64_t in_f, int bits, int64_t group_size, int threads, int limbs) {
    if (M < 1 || i8_range(bits, 1, group_size, limbs) == NULL) return -1;
    int64_t groups = in_f / group_size, blocks = (out_f + 63) / 64;
    int_x bx;
    int rc = int_x_alloc(&bx, M, in_f, groups, limbs);
    if (rc != 0) return rc;
    prepare_x_i8(x, bx.xq, bx.sx, bx.xqsf, bx.nlimb, M, in_f, group_size, limbs, bx.limb_stride);
    if (threads <= 1 || out_f * in_f * M < (1 << 19)) { /* small: no thread team (its start-up costs ~1 us) */
        float *fr = (float *)malloc(sizeof(float) * (size_t)(4 * groups));
        if (fr == NULL) rc = -2;
        else gemv_int_blocks(&bx, qweight, scales, zeros, y, M, out_f, in_f, bits, group_size, limbs, fr, 0, blocks);
        free(fr);
        int_x_free(&bx);
        return rc;
    }
#pragma omp parallel num_threads(threads)
    {
        float *fr = (float *)malloc(sizeof(float) * (size_t)(4 * groups));
        if (fr == NULL) {
#pragma omp atomic write
            rc = -2;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++)
            if (fr != NULL)
                gemv_int_blocks(&bx, qweight, scales, zeros, y, M, out_f, in_f, bits, group_size, limbs, fr, b, b + 1);
        free(fr);
    }
    int_x_free(&bx);
    return rc;
}

/* y (M, out_f) = x (M, in_f) @ W.T in fp32 (QuantLinear's decode): four-limb integer dots where the vector kernel
 * exists, else the FMA GEMV. */
int mc_gemv(const float *x, const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, float *y,
            int64_t M, int64_t out_f, int64_t in_f, int bits, int64_t group_size, int threads) {
    if (i8_range(bits, 1, group_size, 4) != NULL)
        return gemv_int(x, qweight, scales, zeros, y, M, out_f, in_f, bits, group_size, threads, 4);
    return gemv_fma(x, qweight, scales, zeros, y, M, out_f, in_f, bits, group_size, threads);
}

/* y (M, out_f) = x (M, in_f) @ W.T with int8 activations (QuantLinear's decode with decode_activations="int8"). */
int mc_gemv_i8(const float *x, const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, float *y,
               int64_t M, int64_t out_f, int64_t in_f, int bits, int64_t group_size, int threads) {
    return gemv_int(x, qweight, scales, zeros, y, M, out_f, in_f, bits, group_size, threads, 1);
}

/* 1 when this build has the vector int8 GEMV (AVX512-VBMI + VNNI), else 0 (the portable loop serves). */
int mc_i8dot_available(void) {
#ifdef MC_HAVE_I8DOT
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------------------------
 * Grouped GEMV for a mixture of experts: the rows of x routed to expert e are rows [start[e], start[e] + count[e])
 * of x (sorted by expert); y rows correspond. Expert e's packed matrix (out_f, in_f) at bits[e] sits at
 * qptr[e] / sptr[e] / zptr[e]. Work items are (expert, block of BLOCK_ROWS output rows), spread over threads, so
 * every expert's weights are read once per call whatever the bit-width mix. Experts with count 0 cost nothing.
 * ------------------------------------------------------------------------------------------------------------- */
#define MOE_BLOCK_ROWS 64
/* weights x rows below which one thread does it all: waking a second thread costs more than it saves there */
#define MOE_PARALLEL_WORK (1 << 21)

/* The work items of a grouped MoE GEMV, e * blocks + b for block b (MOE_BLOCK_ROWS output rows) of every expert
 * with rows; *items their number, *rows the rows of x they read (the largest start + count), *work the weights
 * times rows. NULL when there are none (*items = 0) or when out of memory. */
static int64_t *moe_items(const int64_t *start, const int64_t *count, int64_t E, int64_t blocks, int64_t weights,
                          int64_t *items, int64_t *rows, int64_t *work) {
    *items = *rows = *work = 0;
    for (int64_t e = 0; e < E; e++) {
        if (count[e] <= 0) continue;
        *rows = start[e] + count[e] > *rows ? start[e] + count[e] : *rows;
        *items += blocks;
        *work += count[e] * weights;
    }
    int64_t *item_expert = *items ? (int64_t *)malloc(sizeof(int64_t) * (size_t)*items) : NULL;
    for (int64_t e = 0, n = 0; item_expert != NULL && e < E; e++)
        for (int64_t b = 0; count[e] > 0 && b < blocks; b++) item_expert[n++] = e * blocks + b;
    return item_expert;
}

/* mc_moe_gemv by integer dots with `limbs` (see gemv_int): the rows of x are prepared once, then the same work
 * items. */
static int moe_gemv_int(const float *x, const int64_t *qptr, const int64_t *sptr, const int64_t *zptr,
                        const int32_t *bits, const int64_t *start, const int64_t *count, int64_t E, float *y,
                        int64_t out_f, int64_t in_f, int64_t group_size, int threads, int limbs) {
    int64_t groups = in_f / group_size, items, P, work, blocks = (out_f + MOE_BLOCK_ROWS - 1) / MOE_BLOCK_ROWS;
    for (int64_t e = 0; e < E; e++)
        if (count[e] > 0 && i8_range(bits[e], 1, group_size, limbs) == NULL) return -1;
    int64_t *item_expert = moe_items(start, count, E, blocks, out_f * in_f, &items, &P, &work);
    if (items == 0) return 0;
    int_x bx = {0};
    int rc = item_expert == NULL || int_x_alloc(&bx, P, in_f, groups, limbs) ? -2 : 0;
    if (rc == 0) {
        for (int64_t e = 0; e < E; e++) {
            if (count[e] <= 0) continue;
            int64_t r = start[e];
            prepare_x_i8(x + r * in_f, bx.xq + r * in_f, bx.sx + r * groups, bx.xqsf + r * groups, bx.nlimb + r * groups,
                         count[e], in_f, group_size, limbs, bx.limb_stride);
        }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && work >= MOE_PARALLEL_WORK)
        for (int64_t it = 0; it < items; it++) {
            int64_t e = item_expert[it] / blocks, b = item_expert[it] % blocks;
            int64_t begin = b * MOE_BLOCK_ROWS, end = begin + MOE_BLOCK_ROWS < out_f ? begin + MOE_BLOCK_ROWS : out_f;
            float *fr = (float *)malloc(sizeof(float) * (size_t)(4 * groups));
            if (fr == NULL) {
#pragma omp atomic write
                rc = -2;
                continue;
            }
            for (int64_t m0 = 0; m0 < count[e]; m0 += 4) {
                int64_t mm = count[e] - m0 < 4 ? count[e] - m0 : 4, r = start[e] + m0;
                i8_args a = int_x_args(&bx, r, (const uint8_t *)(intptr_t)qptr[e], (const uint16_t *)(intptr_t)sptr[e],
                                       (const uint16_t *)(intptr_t)zptr[e], y + r * out_f, out_f, in_f, group_size, fr);
                i8_range(bits[e], mm, group_size, limbs)(&a, begin, end);
            }
            free(fr);
        }
    }
    free(item_expert);
    int_x_free(&bx);
    return rc;
}

/* Returns 0, -1 for an unsupported bit-width, -2 when out of memory. */
int mc_moe_gemv(const float *x, const int64_t *qptr, const int64_t *sptr, const int64_t *zptr, const int32_t *bits,
                const int64_t *start, const int64_t *count, int64_t E, float *y, int64_t out_f, int64_t in_f,
                int64_t group_size, int threads, int int8_act) {
    if (int8_act) return moe_gemv_int(x, qptr, sptr, zptr, bits, start, count, E, y, out_f, in_f, group_size, threads, 1);
    if (i8_range(2, 1, group_size, 4) != NULL) /* fp32: four-limb integer dots where the vector kernel exists */
        return moe_gemv_int(x, qptr, sptr, zptr, bits, start, count, E, y, out_f, in_f, group_size, threads, 4);
    int64_t groups = in_f / group_size, items, P, work, blocks = (out_f + MOE_BLOCK_ROWS - 1) / MOE_BLOCK_ROWS;
    for (int64_t e = 0; e < E; e++)
        if (count[e] > 0 && gemv_range(bits[e], 1) == NULL) return -1;
    int64_t *item_expert = moe_items(start, count, E, blocks, out_f * in_f, &items, &P, &work);
    if (items == 0) return 0;
    float *xs = (float *)malloc(sizeof(float) * (size_t)(P * in_f));
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(P * groups));
    int rc = (xs == NULL || xsum == NULL || item_expert == NULL) ? -2 : 0;
    if (rc == 0) {
        for (int64_t e = 0; e < E; e++) {
            if (count[e] <= 0) continue;
            prepare_x(x + start[e] * in_f, xs + start[e] * in_f, xsum + start[e] * groups, count[e], in_f, bits[e],
                      group_size);
        }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && work >= MOE_PARALLEL_WORK)
        for (int64_t it = 0; it < items; it++) {
            int64_t e = item_expert[it] / blocks, b = item_expert[it] % blocks;
            int64_t begin = b * MOE_BLOCK_ROWS, end = begin + MOE_BLOCK_ROWS < out_f ? begin + MOE_BLOCK_ROWS : out_f;
            int eb = bits[e];
            uint8_t *pad = NULL;
            if (end == out_f) { /* this block holds the last row, whose 32-bit loads may run past the buffer */
                pad = (uint8_t *)malloc((size_t)(in_f * eb / 8) + 8);
                if (pad == NULL) {
#pragma omp atomic write
                    rc = -2;
                    continue;
                }
            }
            for (int64_t m0 = 0; m0 < count[e]; m0 += 4) {
                int64_t mm = count[e] - m0 < 4 ? count[e] - m0 : 4, r = start[e] + m0;
                gemv_args a = {(const uint8_t *)(intptr_t)qptr[e], (const uint16_t *)(intptr_t)sptr[e],
                               (const uint16_t *)(intptr_t)zptr[e], xs + r * in_f, xsum + r * groups, y + r * out_f,
                               out_f, in_f, group_size, pad};
                gemv_range(eb, mm)(&a, begin, end);
            }
            free(pad);
        }
    }
    free(item_expert);
    free(xs);
    free(xsum);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
 * A whole MoE layer for a few tokens (decode) in one call: sort the (token, slot) pairs by expert (counting sort;
 * dropped slots, index == E, are left out), gather their rows of x, grouped GEMV of gate_up, act(gate) * up,
 * grouped GEMV of down, then out[t] = sum of w[t, k] * y over the token's kept slots, in expert order.
 * act: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation), 3 relu (each act(gate) * up), 4 gpt-oss's clamped SwiGLU
 * (kernels/activations.py: gate clamped to <= 7, up to [-7, 7], (up + 1) * gate * sigmoid(1.702 * gate)).
 * ------------------------------------------------------------------------------------------------------------- */

static inline float activate(float v, int act) {
    switch (act) {
        case 0: return v / (1.0f + expf(-v));
        case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        case 2: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        default: return v > 0.0f ? v : 0.0f;
    }
}

static inline float gated(float g, float u, int act) {
    if (act != 4) return activate(g, act) * u;
    g = g < 7.0f ? g : 7.0f;
    u = u < -7.0f ? -7.0f : (u > 7.0f ? 7.0f : u);
    return (u + 1.0f) * (g / (1.0f + expf(-1.702f * g)));
}

/* Online dynamic pruning's routing rule (pruning/rule.py, evaluated in the same fp32 operations): a token drops a
 * slot other than its first top-weight slot when weight / max(top, 1e-20) < threshold (index -> E, weight 0); the
 * kept weights are rescaled to the original sum. idx2 / w2 receive the rewritten routing. */
static void odp_rule(const int64_t *idx, const float *w, int64_t T, int64_t K, int64_t E, float threshold,
                     int64_t *idx2, float *w2) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t *it = idx + t * K;
        const float *wt = w + t * K;
        int64_t top = 0;
        for (int64_t k = 1; k < K; k++)
            if (wt[k] > wt[top]) top = k;
        float denom = wt[top] > 1e-20f ? wt[top] : 1e-20f, total = 0.0f, kept = 0.0f;
        for (int64_t k = 0; k < K; k++) total += wt[k];
        for (int64_t k = 0; k < K; k++) {
            int drop = k != top && wt[k] / denom < threshold;
            idx2[t * K + k] = drop ? E : it[k];
            w2[t * K + k] = drop ? 0.0f : wt[k];
            kept += w2[t * K + k];
        }
        float scale = total / (kept > 1e-20f ? kept : 1e-20f);
        for (int64_t k = 0; k < K; k++) w2[t * K + k] = w2[t * K + k] * scale;
    }
}

/* Returns 0, -1 for an unsupported bit-width, -2 when out of memory, -3 for an index outside [0, E].
 * odp_threshold > 0 applies ODP's rule to the routing first; odp_counts (E + 3 int64, or NULL) accumulates ODP's
 * statistics: slots evaluated per expert [0, E), dropped slots [E], tokens [E + 2]. int8_act != 0 rounds the
 * GEMVs' inputs to int8 per group (the int8-activation GEMV above); 0 keeps them fp32. bits holds 2E widths: the
 * gate/up matrices' (bits[e]), then the down matrices' (bits[E + e]). gu_bias (E, 2I) / dn_bias (E, H) fp32, or
 * NULL: the experts' biases, added to each projection's output (gpt-oss). */
int mc_moe_decode(const float *x, int64_t T, int64_t K, const int64_t *idx_in, const float *w_in, const int64_t *gq,
                  const int64_t *gs, const int64_t *gz, const int64_t *dq, const int64_t *ds, const int64_t *dz,
                  const int32_t *bits, int64_t E, int64_t H, int64_t I, int64_t group_gu, int64_t group_dn, int act,
                  float *out, int threads, float odp_threshold, int64_t *odp_counts, int int8_act,
                  const float *gu_bias, const float *dn_bias) {
    memset(out, 0, sizeof(float) * (size_t)(T * H));
    int64_t *count = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    int64_t *start = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    int64_t *fill = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    int64_t *pair = (int64_t *)malloc(sizeof(int64_t) * (size_t)(T * K + 1));
    int64_t *idx_odp = (int64_t *)malloc(sizeof(int64_t) * (size_t)(T * K + 1));
    float *w_odp = (float *)malloc(sizeof(float) * (size_t)(T * K + 1));
    int rc = (count == NULL || start == NULL || fill == NULL || pair == NULL || idx_odp == NULL || w_odp == NULL) ? -2 : 0;
    float *xg = NULL, *h = NULL, *y = NULL;
    const int64_t *idx = idx_in;
    const float *w = w_in;
    int64_t P = 0;
    for (int64_t p = 0; rc == 0 && p < T * K; p++)
        if (idx[p] < 0 || idx[p] > E) rc = -3;
    if (rc == 0 && odp_threshold > 0.0f) {
        odp_rule(idx_in, w_in, T, K, E, odp_threshold, idx_odp, w_odp);
        idx = idx_odp;
        w = w_odp;
    }
    for (int64_t p = 0; rc == 0 && p < T * K; p++)
        if (idx[p] < E) count[idx[p]]++;
    if (rc == 0 && odp_counts != NULL) {
        for (int64_t p = 0; p < T * K; p++) odp_counts[idx[p]]++;
        odp_counts[E + 2] += T;
    }
    if (rc == 0) {
        for (int64_t e = 0; e < E; e++) {
            start[e] = P;
            P += count[e];
        }
        for (int64_t p = 0; p < T * K; p++)
            if (idx[p] < E) pair[start[idx[p]] + fill[idx[p]]++] = p;
        xg = (float *)malloc(sizeof(float) * (size_t)(P * H + 1));
        h = (float *)malloc(sizeof(float) * (size_t)(P * 2 * I + 1));
        y = (float *)malloc(sizeof(float) * (size_t)(P * H + 1));
        if (xg == NULL || h == NULL || y == NULL) rc = -2;
    }
    if (rc == 0 && P > 0) {
        for (int64_t r = 0; r < P; r++) memcpy(xg + r * H, x + (pair[r] / K) * H, sizeof(float) * (size_t)H);
        rc = mc_moe_gemv(xg, gq, gs, gz, bits, start, count, E, h, 2 * I, H, group_gu, threads, int8_act);
        if (rc == 0) {
            /* glu(gate + b, up + b), compacted in place into (P, I): rows in increasing order (sorted by expert) */
            for (int64_t e = 0; e < E; e++) {
                const float *gb = gu_bias != NULL ? gu_bias + e * 2 * I : NULL;
                for (int64_t r = start[e]; r < start[e] + count[e]; r++) {
                    float *hr = h + r * 2 * I, *ar = h + r * I;
                    if (gb == NULL)
                        for (int64_t j = 0; j < I; j++) ar[j] = gated(hr[j], hr[I + j], act);
                    else
                        for (int64_t j = 0; j < I; j++) ar[j] = gated(hr[j] + gb[j], hr[I + j] + gb[I + j], act);
                }
            }
            rc = mc_moe_gemv(h, dq, ds, dz, bits + E, start, count, E, y, H, I, group_dn, threads, int8_act);
        }
        if (rc == 0) {
            for (int64_t e = 0; e < E; e++) {
                const float *db = dn_bias != NULL ? dn_bias + e * H : NULL;
                for (int64_t r = start[e]; r < start[e] + count[e]; r++) {
                    float wr = w[pair[r]], *o = out + (pair[r] / K) * H;
                    const float *yr = y + r * H;
                    if (db == NULL)
                        for (int64_t j = 0; j < H; j++) o[j] += wr * yr[j];
                    else
                        for (int64_t j = 0; j < H; j++) o[j] += wr * (yr[j] + db[j]);
                }
            }
        }
    }
    free(count);
    free(start);
    free(fill);
    free(pair);
    free(idx_odp);
    free(w_odp);
    free(xg);
    free(h);
    free(y);
    return rc;
}

/* bf16 dequantization shared by the AMX and AVX512-BF16 prefill kernels below. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MC_HAVE_BF16_DQ 1
/* 16 codes of a row, shifted down to the low bits, as floats (b <= 4: two 32-bit loads at bytes 0 and b). */
static inline __attribute__((always_inline)) __m512 codes16(const uint8_t *src, int64_t c, const int BITS) {
    if (BITS == 8) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + 16 * c))));
    const uint8_t *p = src + 2 * BITS * c;
    __m512i v = _mm512_mask_set1_epi32(_mm512_set1_epi32((int)load_u32(p)), 0xFF00, (int)load_u32(p + BITS));
    const int b = BITS;
    v = _mm512_srlv_epi32(v, _mm512_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b, 0, b, 2 * b, 3 * b,
                                               4 * b, 5 * b, 6 * b, 7 * b));
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32((1 << BITS) - 1)));
}

static inline __attribute__((always_inline)) void dequantize_row_bf16(const uint8_t *row, const uint16_t *s16,
                                                                      const uint16_t *z16, uint16_t *dst,
                                                                      int64_t in_f, int64_t group_size,
                                                                      const int BITS) {
    int64_t groups = in_f / group_size, chunks = group_size / 16;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *src = row + g * group_size * BITS / 8;
        _mm_prefetch((const char *)src + GEMV_PREFETCH, _MM_HINT_T0);
        __m512 vs = _mm512_set1_ps(half_to_float(s16[g])), vz = _mm512_set1_ps(half_to_float(z16[g]));
        uint16_t *d = dst + g * group_size;
        for (int64_t c = 0; c < chunks; c++) {
            __m512 w = _mm512_mul_ps(_mm512_sub_ps(codes16(src, c, BITS), vz), vs);
            _mm256_storeu_si256((__m256i *)(d + 16 * c), (__m256i)_mm512_cvtneps_pbh(w));
        }
    }
}

#endif

/* ---------------------------------------------------------------------------------------------------------------
 * Prefill with bf16 activations on AMX: y (M, N) fp32 = x (M, K) bf16 @ W.T, W (N, K) packed, with W dequantized
 * into bf16 32 rows at a time (a block that stays in L2) and fed straight to the tile unit, never written out whole.
 * The tiles compute y.T = W @ x.T: W's dequantized rows are the A operand as they are (16 rows x 32 k), x is
 * re-laid once per call into the pair-interleaved B layout (16 k-pairs x 16 rows of x). Same rounding as
 * dequantizing into bf16 and calling bf16 BLAS: (q - zero) * scale in fp32 rounded to bf16 (nearest even),
 * products summed in fp32. Returns -1 where the CPU or the build has no AMX (the caller then uses BLAS).
 * ------------------------------------------------------------------------------------------------------------- */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define MC_HAVE_AMX 1
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

/* Every tile: 16 rows of 64 bytes (16 fp32 or 32 bf16). A constant, not a struct filled on the stack: GCC at -O3
 * may treat stores into a local that only ldtilecfg reads as dead once the function is inlined (seen while
 * prototyping an AMX-INT8 kernel: ldtilecfg then read garbage and faulted). */
static const amx_tilecfg amx_cfg __attribute__((aligned(64))) = {
    1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

static inline void amx_configure(void) { _tile_loadconfig(&amx_cfg); }

static void dequantize_rows_bf16(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros,
                                 uint16_t *dst, int64_t first, int64_t count, int64_t rows, int64_t in_f, int bits,
                                 int64_t group_size, uint8_t *pad) {
    int64_t row_bytes = in_f * bits / 8, groups = in_f / group_size;
    for (int64_t i = 0; i < count; i++) {
        int64_t o = first + i;
        const uint8_t *row = row_ptr(qweight, o, rows, row_bytes, pad);
        const uint16_t *s = scales + o * groups, *z = zeros + o * groups;
        uint16_t *d = dst + i * in_f;
        switch (bits) {
            case 1: dequantize_row_bf16(row, s, z, d, in_f, group_size, 1); break;
            case 2: dequantize_row_bf16(row, s, z, d, in_f, group_size, 2); break;
            case 3: dequantize_row_bf16(row, s, z, d, in_f, group_size, 3); break;
            case 4: dequantize_row_bf16(row, s, z, d, in_f, group_size, 4); break;
            default: dequantize_row_bf16(row, s, z, d, in_f, group_size, 8); break;
        }
    }
}
#endif

/* 1 if the AMX prefill kernel can run here (built with AMX, and the kernel grants this process the tile state). */
int mc_amx_available(void) {
#ifdef MC_HAVE_AMX
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

/* y rows have stride ldy floats. Returns 0, -1 (no AMX, or shapes it does not take), -2 when out of memory. */
int mc_amx_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                  const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy,
                  int threads) {
#ifdef MC_HAVE_AMX
    if (M < 1 || N < 1 || K % 32 || group_size % 16 || K % group_size || gemv_range(bits, 1) == NULL) return -1;
    int64_t Mp = (M + 31) / 32 * 32, KB = K / 32, NB = (N + 31) / 32;
    /* x in the B layout: block (m16, kb) is 16 rows r x 16 columns i of bf16 pairs x[16*m16 + i][32*kb + 2r + {0,1}] */
    uint32_t *xv = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)(Mp * K / 2));
    if (xv == NULL) return -2;
    const uint32_t *x32 = (const uint32_t *)x;
    for (int64_t m16 = 0; m16 < Mp / 16; m16++)
        for (int64_t kb = 0; kb < KB; kb++) {
            uint32_t *blk = xv + (m16 * KB + kb) * 256;
            for (int64_t r = 0; r < 16; r++)
                for (int64_t i = 0; i < 16; i++) {
                    int64_t m = 16 * m16 + i;
                    blk[r * 16 + i] = m < M ? x32[m * (K / 2) + 16 * kb + r] : 0u;
                }
        }
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && NB > 1 && M * N * K >= (1 << 24))
    {
        uint16_t *buf = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (size_t)(32 * K));
        uint8_t *pad = (uint8_t *)malloc((size_t)(K * bits / 8) + 8);
        float tmp[4][256];
        if (buf == NULL || pad == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            amx_configure();
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t nb = 0; nb < NB; nb++) {
            if (buf == NULL || pad == NULL) continue;
            int64_t n0 = 32 * nb, nn = N - n0 < 32 ? N - n0 : 32;
            dequantize_rows_bf16(qweight, scales, zeros, buf, n0, nn, N, K, bits, group_size, pad);
            if (nn < 32) memset(buf + nn * K, 0, sizeof(uint16_t) * (size_t)((32 - nn) * K));
            for (int64_t m32 = 0; m32 < Mp / 32; m32++) {
                const uint32_t *b0 = xv + (2 * m32) * KB * 256, *b1 = xv + (2 * m32 + 1) * KB * 256;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t kb = 0; kb < KB; kb++) {
                    _tile_loadd(4, buf + 32 * kb, K * 2);
                    _tile_loadd(5, buf + 16 * K + 32 * kb, K * 2);
                    _tile_loadd(6, b0 + kb * 256, 64);
                    _tile_loadd(7, b1 + kb * 256, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, tmp[0], 64);
                _tile_stored(1, tmp[1], 64);
                _tile_stored(2, tmp[2], 64);
                _tile_stored(3, tmp[3], 64);
                for (int t = 0; t < 4; t++) { /* tile t: W rows 16 * (t / 2) + i, x rows 16 * (t % 2) + j */
                    for (int64_t j = 0; j < 16; j++) {
                        int64_t m = 32 * m32 + 16 * (t % 2) + j;
                        if (m >= M) break;
                        for (int64_t i = 0; i < 16; i++) {
                            int64_t n = n0 + 16 * (t / 2) + i;
                            if (n < N) y[m * ldy + n] = tmp[t][i * 16 + j];
                        }
                    }
                }
            }
        }
        if (buf != NULL && pad != NULL) _tile_release();
        free(buf);
        free(pad);
    }
    free(xv);
    return failed ? -2 : 0;
#else
    (void)x, (void)M, (void)K, (void)qweight, (void)scales, (void)zeros, (void)N, (void)bits, (void)group_size;
    (void)y, (void)ldy, (void)threads;
    return -1;
#endif
}

/* ---------------------------------------------------------------------------------------------------------------
 * Prefill with bf16 activations on AVX512-BF16 without AMX (AMD Zen 4/5, Intel Cooper Lake): the same contract as
 * mc_amx_linear (y (M, N) fp32 = x (M, K) bf16 @ bf16(W).T, W rounded to bf16 nearest even, fp32 sums). Each work
 * item takes BF16_ROWS output rows; per block of inputs it dequantizes those rows into a small row-major buffer
 * (L1/L2) and runs a register-blocked micro-kernel over all tokens: 12 weight rows x 32 tokens = 24 fp32
 * accumulators, lanes over tokens (x re-laid once per call into blocks of 16 tokens), each weight broadcast from
 * the buffer as it is (no transposition of the weight). Two micro-kernels, one contract:
 *   - mc_bf16_linear: vdpbf16ps on bf16 weight pairs (x pair-interleaved, as for AMX), BF16_KC inputs per block;
 *   - mc_bf16_linear_fma: vfmadd231ps on the same bf16-rounded weights held as fp32 (x widened to fp32, exact),
 *     BF16_KC_FMA inputs per block. For CPUs where vdpbf16ps runs at under half the rate of fp32 FMA (measured on
 *     Sapphire Rapids: ~4x fewer instructions per cycle, so half the products per cycle).
 * bf16 x bf16 products are exact in fp32, so both round once per addition, like AMX. The accumulators live in a
 * per-thread (rows x tokens) tile between input blocks, so every sum is one chain in input order whatever the
 * blocking and the threads (threads give identical results).
 * Dequantization: with AVX512-VBMI, 32 (16) codes become 32 bf16 (16 fp32) weights in three permutes (byte permute
 * + multishift put each code in the low bits of a 16- (32-) bit lane, vpermw (vpermps) looks it up in the group's
 * table of the 2^b values bf16((q - zero) * scale), computed with the same fp32 operations as dequantize_row_bf16:
 * identical bits); 8-bit codes and CPUs without VBMI convert 16 codes at a time in fp32 (the same arithmetic).
 * Returns 0, -1 (not built with AVX512-BF16, or shapes it does not take), -2 when out of memory.
 * ------------------------------------------------------------------------------------------------------------- */
#ifndef BF16_ROWS
#define BF16_ROWS 48 /* output rows per work item: a multiple of 12 (the micro-kernel's rows) */
#endif
#ifndef BF16_KC
#define BF16_KC 512 /* inputs per block, vdpbf16ps kernel (bf16 buffer): a multiple of 32 */
#endif
#ifndef BF16_KC_FMA
#define BF16_KC_FMA 256 /* inputs per block, FMA kernel (fp32 buffer): a multiple of 32 */
#endif

#ifdef MC_HAVE_BF16_DQ
#define MC_HAVE_BF16_LINEAR 1

#ifdef __AVX512VBMI__
typedef struct {
    __m512i perm, ctl, q;
} codes_consts;

/* LANES (32 word or 16 dword lanes) codes, lane i getting code i in its low bits: qword j holds lanes
 * LANES / 8 * j .. + LANES / 8 - 1, whose codes start at stream bit sb = LANES / 8 * j * BITS; the byte permute moves
 * the 8 bytes from byte sb / 8 into qword j, the multishift takes 8 bits at bit sb % 8 + t * BITS into the low byte
 * of lane t of the qword. Bits above the code are left: the table repeats with period 2^BITS over its entries, and
 * vpermw / vpermps read only the low 5 / 4 bits of an index. */
static codes_consts codes_init(int bits, int lanes) {
    int8_t perm[64], ctl[64];
    float q[16];
    int per = lanes / 8, width = 8 / per; /* lanes per qword, bytes per lane */
    for (int j = 0; j < 8; j++) {
        int sb = per * j * bits;
        for (int t = 0; t < 8; t++) {
            perm[8 * j + t] = (int8_t)(sb / 8 + t < 64 ? sb / 8 + t : 63);
            ctl[8 * j + t] = (int8_t)(t % width ? 0 : sb % 8 + (t / width) * bits);
        }
    }
    for (int i = 0; i < 16; i++) q[i] = (float)(i & ((1 << bits) - 1));
    codes_consts c = {_mm512_loadu_si512(perm), _mm512_loadu_si512(ctl), _mm512_castps_si512(_mm512_loadu_ps(q))};
    return c;
}
#endif

/* w rounded to bf16 (nearest even, like the cast) and widened back to fp32 (exact). */
static inline __attribute__((always_inline)) __m512 round_bf16_ps(__m512 w) {
    __m256i h = (__m256i)_mm512_cvtneps_pbh(w);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Columns k0 .. k0 + kc of one packed row (BITS-bit codes, group_size % 32 == 0, k0 % 32 == 0) rounded to bf16,
 * into dst as bf16 (F32 = 0) or as fp32 (F32 = 1). */
static inline __attribute__((always_inline)) void dequantize_cols(const uint8_t *row, const uint16_t *s16,
                                                                  const uint16_t *z16, void *dst, int64_t k0,
                                                                  int64_t kc, int64_t group_size,
                                                                  const void *consts, const int BITS, const int F32) {
    _mm_prefetch((const char *)(row + (k0 + kc) * BITS / 8), _MM_HINT_T0); /* this row's next block */
    _mm_prefetch((const char *)(row + (k0 + kc) * BITS / 8 + 64), _MM_HINT_T0);
#ifdef __AVX512VBMI__
    if (BITS <= 4) {
        const codes_consts *cc = (const codes_consts *)consts;
        __m512i table = _mm512_setzero_si512();
        int64_t g_now = -1;
        for (int64_t k = k0; k < k0 + kc; k += 32) {
            int64_t g = k / group_size;
            if (g != g_now) { /* the 2^BITS weights of this group rounded to bf16, repeated over the lanes */
                __m512 vs = _mm512_set1_ps(half_to_float(s16[g])), vz = _mm512_set1_ps(half_to_float(z16[g]));
                __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_castsi512_ps(cc->q), vz), vs);
                table = F32 ? _mm512_castps_si512(round_bf16_ps(w))
                            : _mm512_broadcast_i64x4((__m256i)_mm512_cvtneps_pbh(w));
                g_now = g;
            }
            const uint8_t *src = row + k * BITS / 8;
            if (F32) {
                float *d = (float *)dst + (k - k0);
                for (int h = 0; h < 2; h++) {
                    __m512i v = _mm512_maskz_loadu_epi8((__mmask64)((1ULL << (2 * BITS)) - 1), src + 2 * BITS * h);
                    v = _mm512_multishift_epi64_epi8(cc->ctl, _mm512_permutexvar_epi8(cc->perm, v));
                    _mm512_storeu_ps(d + 16 * h, _mm512_permutexvar_ps(v, _mm512_castsi512_ps(table)));
                }
            } else {
                __m512i v = _mm512_maskz_loadu_epi8((__mmask64)((1ULL << (4 * BITS)) - 1), src);
                v = _mm512_multishift_epi64_epi8(cc->ctl, _mm512_permutexvar_epi8(cc->perm, v));
                _mm512_storeu_si512((void *)((uint16_t *)dst + (k - k0)), _mm512_permutexvar_epi16(v, table));
            }
        }
        return;
    }
#endif
    (void)consts;
    for (int64_t k = k0; k < k0 + kc; k += 32) {
        int64_t g = k / group_size;
        __m512 vs = _mm512_set1_ps(half_to_float(s16[g])), vz = _mm512_set1_ps(half_to_float(z16[g]));
        const uint8_t *src = row + k * BITS / 8; /* codes16(src, c): codes 16c .. 16c + 15 from src */
        for (int64_t c = 0; c < 2; c++) {
            __m512 w = _mm512_mul_ps(_mm512_sub_ps(codes16(src, c, BITS), vz), vs);
            if (F32)
                _mm512_storeu_ps((float *)dst + (k - k0) + 16 * c, round_bf16_ps(w));
            else
                _mm256_storeu_si256((__m256i *)((uint16_t *)dst + (k - k0) + 16 * c), (__m256i)_mm512_cvtneps_pbh(w));
        }
    }
}

static void dequantize_block(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, void *dst,
                             int64_t first, int64_t count, int64_t rows, int64_t in_f, int bits, int64_t group_size,
                             int64_t k0, int64_t kc, const void *consts, uint8_t *pad, int f32) {
    int64_t row_bytes = in_f * bits / 8, groups = in_f / group_size;
    for (int64_t i = 0; i < count; i++) {
        int64_t o = first + i;
        const uint8_t *row = row_ptr(qweight, o, rows, row_bytes, pad);
        const uint16_t *s = scales + o * groups, *z = zeros + o * groups;
        void *d = f32 ? (void *)((float *)dst + i * kc) : (void *)((uint16_t *)dst + i * kc);
#define MC_DQ_COLS(B)                                                                                               \
    (f32 ? dequantize_cols(row, s, z, d, k0, kc, group_size, consts, B, 1)                                         \
         : dequantize_cols(row, s, z, d, k0, kc, group_size, consts, B, 0))
        switch (bits) {
            case 1: MC_DQ_COLS(1); break;
            case 2: MC_DQ_COLS(2); break;
            case 3: MC_DQ_COLS(3); break;
            case 4: MC_DQ_COLS(4); break;
            default: MC_DQ_COLS(8); break;
        }
#undef MC_DQ_COLS
    }
}

/* acc[r * lda + 16 v + i] += sum over the np pairs p of w[r][p] . x[16 v + i][p] for r < 12, v < MV (vdpbf16ps):
 * w rows are ws uint32 (bf16 pairs) apart, x0 / x1 point at blocks of 16 tokens (16 uint32 per pair). */
static inline __attribute__((always_inline)) void dp_tile(const uint32_t *w, int64_t ws, const uint32_t *x0,
                                                          const uint32_t *x1, int64_t np, float *acc, int64_t lda,
                                                          const int MV) {
    __m512 c0[12], c1[12];
    for (int r = 0; r < 12; r++) {
        c0[r] = _mm512_loadu_ps(acc + r * lda);
        c1[r] = MV == 2 ? _mm512_loadu_ps(acc + r * lda + 16) : _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < np; p++) {
        __m512bh a0 = (__m512bh)_mm512_loadu_si512((const void *)(x0 + 16 * p));
        __m512bh a1 = MV == 2 ? (__m512bh)_mm512_loadu_si512((const void *)(x1 + 16 * p)) : a0;
        for (int r = 0; r < 12; r++) {
            __m512bh b = (__m512bh)_mm512_set1_epi32((int)w[r * ws + p]);
            c0[r] = _mm512_dpbf16_ps(c0[r], a0, b);
            if (MV == 2) c1[r] = _mm512_dpbf16_ps(c1[r], a1, b);
        }
    }
    for (int r = 0; r < 12; r++) {
        _mm512_storeu_ps(acc + r * lda, c0[r]);
        if (MV == 2) _mm512_storeu_ps(acc + r * lda + 16, c1[r]);
    }
}

/* The same with fp32 FMA over the nk inputs: w rows ws floats apart, x0 / x1 blocks of 16 tokens (16 floats per
 * input). */
static inline __attribute__((always_inline)) void fma_tile(const float *w, int64_t ws, const float *x0,
                                                           const float *x1, int64_t nk, float *acc, int64_t lda,
                                                           const int MV) {
    __m512 c0[12], c1[12];
    for (int r = 0; r < 12; r++) {
        c0[r] = _mm512_loadu_ps(acc + r * lda);
        c1[r] = MV == 2 ? _mm512_loadu_ps(acc + r * lda + 16) : _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < nk; k++) {
        __m512 a0 = _mm512_loadu_ps(x0 + 16 * k);
        __m512 a1 = MV == 2 ? _mm512_loadu_ps(x1 + 16 * k) : a0;
        for (int r = 0; r < 12; r++) {
            __m512 b = _mm512_set1_ps(w[r * ws + k]);
            c0[r] = _mm512_fmadd_ps(a0, b, c0[r]);
            if (MV == 2) c1[r] = _mm512_fmadd_ps(a1, b, c1[r]);
        }
    }
    for (int r = 0; r < 12; r++) {
        _mm512_storeu_ps(acc + r * lda, c0[r]);
        if (MV == 2) _mm512_storeu_ps(acc + r * lda + 16, c1[r]);
    }
}

static int bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                       const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy,
                       int threads, const int fma) {
    if (M < 1 || N < 1 || K % 32 || group_size < 32 || group_size % 32 || K % group_size ||
        gemv_range(bits, 1) == NULL)
        return -1;
    const int64_t R = BF16_ROWS, KP = K / 2, M16 = (M + 15) / 16, Mp = 16 * M16, NB = (N + R - 1) / R;
    const int64_t KC = fma ? BF16_KC_FMA : BF16_KC, esz = fma ? 4 : 2;
    /* x in blocks of 16 tokens (zero past M): dp: xv[(t * KP + p) * 16 + i] = pair p of token 16 t + i;
     * fma: xv[(t * K + k) * 16 + i] = x[16 t + i][k] widened to fp32 */
    uint32_t *xv = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)(Mp * (fma ? K : KP)));
    if (xv == NULL) return -2;
    const uint32_t *x32 = (const uint32_t *)x;
    for (int64_t t = 0; t < M16; t++)
        if (fma)
            for (int64_t k = 0; k < K; k++)
                for (int64_t i = 0; i < 16; i++) {
                    int64_t m = 16 * t + i;
                    xv[(t * K + k) * 16 + i] = m < M ? (uint32_t)x[m * K + k] << 16 : 0u;
                }
        else
            for (int64_t p = 0; p < KP; p++)
                for (int64_t i = 0; i < 16; i++) {
                    int64_t m = 16 * t + i;
                    xv[(t * KP + p) * 16 + i] = m < M ? x32[m * KP + p] : 0u;
                }
    const void *consts = NULL;
#ifdef __AVX512VBMI__
    codes_consts cc = codes_init(bits <= 4 ? bits : 4, fma ? 16 : 32);
    consts = &cc;
#endif
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && NB > 1 && M * N * K >= (1 << 24))
    {
        const int64_t kc_max = K < KC ? K : KC;
        void *buf = aligned_alloc(64, (size_t)(esz * R * kc_max));
        float *acc = (float *)aligned_alloc(64, sizeof(float) * (size_t)(R * Mp));
        uint8_t *pad = (uint8_t *)malloc((size_t)(K * bits / 8) + 8);
        if (buf == NULL || acc == NULL || pad == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t nb = 0; nb < NB; nb++) {
            if (buf == NULL || acc == NULL || pad == NULL) continue;
            int64_t n0 = R * nb, nn = N - n0 < R ? N - n0 : R;
            memset(acc, 0, sizeof(float) * (size_t)(R * Mp));
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                int64_t kc = K - k0 < KC ? K - k0 : KC;
                dequantize_block(qweight, scales, zeros, buf, n0, nn, N, K, bits, group_size, k0, kc, consts, pad,
                                 fma);
                if (nn < R) memset((char *)buf + esz * nn * kc, 0, (size_t)(esz * (R - nn) * kc));
                for (int64_t t = 0; t < M16; t += 2) {
                    float *a = acc + 16 * t;
                    for (int64_t r0 = 0; r0 < nn; r0 += 12) {
                        if (fma) {
                            const float *w = (const float *)buf + r0 * kc;
                            const float *x0 = (const float *)xv + (t * K + k0) * 16, *x1 = x0 + K * 16;
                            if (t + 1 < M16)
                                fma_tile(w, kc, x0, x1, kc, a + r0 * Mp, Mp, 2);
                            else
                                fma_tile(w, kc, x0, x0, kc, a + r0 * Mp, Mp, 1);
                        } else {
                            const uint32_t *w = (const uint32_t *)buf + r0 * (kc / 2);
                            const uint32_t *x0 = xv + (t * KP + k0 / 2) * 16, *x1 = x0 + KP * 16;
                            if (t + 1 < M16)
                                dp_tile(w, kc / 2, x0, x1, kc / 2, a + r0 * Mp, Mp, 2);
                            else
                                dp_tile(w, kc / 2, x0, x0, kc / 2, a + r0 * Mp, Mp, 1);
                        }
                    }
                }
            }
            for (int64_t m = 0; m < M; m++)
                for (int64_t r = 0; r < nn; r++) y[m * ldy + n0 + r] = acc[r * Mp + m];
        }
        free(buf);
        free(acc);
        free(pad);
    }
    free(xv);
    return failed ? -2 : 0;
}
#endif

/* 1 if mc_bf16_linear / mc_bf16_linear_fma are built (AVX512-BF16; -march=native, so the CPU has it). */
int mc_bf16_available(void) {
#ifdef MC_HAVE_BF16_LINEAR
    return 1;
#else
    return 0;
#endif
}

/* y rows have stride ldy floats. Returns 0, -1 (not built, or shapes it does not take), -2 when out of memory. */
int mc_bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                   const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy,
                   int threads) {
#ifdef MC_HAVE_BF16_LINEAR
    return bf16_linear(x, M, K, qweight, scales, zeros, N, bits, group_size, y, ldy, threads, 0);
#else
    (void)x, (void)M, (void)K, (void)qweight, (void)scales, (void)zeros, (void)N, (void)bits, (void)group_size;
    (void)y, (void)ldy, (void)threads;
    return -1;
#endif
}

/* The same contract with fp32 FMA (see above). */
int mc_bf16_linear_fma(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                       const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy,
                       int threads) {
#ifdef MC_HAVE_BF16_LINEAR
    return bf16_linear(x, M, K, qweight, scales, zeros, N, bits, group_size, y, ldy, threads, 1);
#else
    (void)x, (void)M, (void)K, (void)qweight, (void)scales, (void)zeros, (void)N, (void)bits, (void)group_size;
    (void)y, (void)ldy, (void)threads;
    return -1;
#endif
}

/* ---------------------------------------------------------------------------------------------------------------
 * Prefill on AVX2 + FMA CPUs without AVX512-BF16 (bf16 hidden states widened to fp32 by the caller): y (M, N) fp32 =
 * x (M, K) fp32 @ W.T with W dequantized exactly as mc_dequantize does ((q - zero) * scale in fp32, unrounded) and
 * fp32 FMA sums. Same structure as bf16_linear above, in 256-bit registers (16 of them): work items of FMA_ROWS
 * output rows, blocks of FMA_KC inputs dequantized into a per-thread fp32 buffer, a 6 rows x 16 tokens micro-kernel
 * (12 accumulators, x re-laid once per call into blocks of 8 tokens), accumulators kept in a per-thread tile between
 * input blocks (one chain per output in input order: threads give identical results). In an AVX-512 build the
 * compiler may still encode it with AVX-512 registers; OPTIMUM_MC_CPU_MARCH=haswell builds the whole library for
 * AVX2 (kernels/cpu.py), which is how an AVX2 CPU is emulated on an AVX-512 one.
 * Returns 0, -1 (not built, or shapes it does not take), -2 when out of memory.
 * ------------------------------------------------------------------------------------------------------------- */
#ifndef FMA_ROWS
#define FMA_ROWS 48 /* a multiple of 6 */
#endif
#ifndef FMA_KC
#define FMA_KC 256 /* a multiple of 8 */
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MC_HAVE_FMA_LINEAR 1

/* columns k0 .. k0 + kc (k0 % 8 == 0, kc % 8 == 0) of one packed row, exactly as dequantize_row computes them */
static inline __attribute__((always_inline)) void fma_dequantize_cols(const uint8_t *row, const uint16_t *s16,
                                                                      const uint16_t *z16, float *dst, int64_t k0,
                                                                      int64_t kc, int64_t group_size, const int BITS) {
    _mm_prefetch((const char *)(row + (k0 + kc) * BITS / 8), _MM_HINT_T0);
    _mm_prefetch((const char *)(row + (k0 + kc) * BITS / 8 + 64), _MM_HINT_T0);
    __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(BITS));
    __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    int64_t g_now = -1;
    __m256 vs = _mm256_setzero_ps(), vz = _mm256_setzero_ps();
    for (int64_t k = k0; k < k0 + kc; k += 8) {
        int64_t g = k / group_size;
        if (g != g_now) {
            vs = _mm256_set1_ps(half_to_float(s16[g]));
            vz = _mm256_set1_ps(half_to_float(z16[g]));
            g_now = g;
        }
        const uint8_t *src = row + k * BITS / 8;
        __m256i q;
        if (BITS == 8) {
            q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)src));
        } else {
            uint32_t v;
            memcpy(&v, src, 4);
            q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)v), shifts), mask);
        }
        _mm256_storeu_ps(dst + (k - k0), _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), vz), vs));
    }
}

/* acc[r * lda + 8 v + i] += sum_k w[r][k] * x[8 v + i][k], r < 6, v < MV (x0 / x1: blocks of 8 tokens). */
static inline __attribute__((always_inline)) void fma8_tile(const float *w, int64_t ws, const float *x0,
                                                            const float *x1, int64_t nk, float *acc, int64_t lda,
                                                            const int MV) {
    __m256 c0[6], c1[6];
    for (int r = 0; r < 6; r++) {
        c0[r] = _mm256_loadu_ps(acc + r * lda);
        c1[r] = MV == 2 ? _mm256_loadu_ps(acc + r * lda + 8) : _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < nk; k++) {
        __m256 a0 = _mm256_loadu_ps(x0 + 8 * k);
        __m256 a1 = MV == 2 ? _mm256_loadu_ps(x1 + 8 * k) : a0;
        for (int r = 0; r < 6; r++) {
            __m256 b = _mm256_broadcast_ss(w + r * ws + k);
            c0[r] = _mm256_fmadd_ps(a0, b, c0[r]);
            if (MV == 2) c1[r] = _mm256_fmadd_ps(a1, b, c1[r]);
        }
    }
    for (int r = 0; r < 6; r++) {
        _mm256_storeu_ps(acc + r * lda, c0[r]);
        if (MV == 2) _mm256_storeu_ps(acc + r * lda + 8, c1[r]);
    }
}

static int fma_linear(const float *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                      const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy,
                      int threads) {
    if (M < 1 || N < 1 || K % 32 || group_size < 32 || group_size % 32 || K % group_size ||
        !(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8))
        return -1;
    const int64_t R = FMA_ROWS, M8 = (M + 7) / 8, Mp = 8 * M8, NB = (N + R - 1) / R;
    float *xv = (float *)aligned_alloc(64, sizeof(float) * (size_t)(Mp * K)); /* xv[(t * K + k) * 8 + i] */
    if (xv == NULL) return -2;
    for (int64_t t = 0; t < M8; t++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t i = 0; i < 8; i++) xv[(t * K + k) * 8 + i] = 8 * t + i < M ? x[(8 * t + i) * K + k] : 0.0f;
    int failed = 0;
    const int64_t row_bytes = K * bits / 8, groups = K / group_size;
#pragma omp parallel num_threads(threads) if (threads > 1 && NB > 1 && M * N * K >= (1 << 24))
    {
        const int64_t kc_max = K < FMA_KC ? K : FMA_KC;
        float *buf = (float *)aligned_alloc(64, sizeof(float) * (size_t)(R * kc_max));
        float *acc = (float *)aligned_alloc(64, sizeof(float) * (size_t)(R * Mp));
        uint8_t *pad = (uint8_t *)malloc((size_t)row_bytes + 8);
        if (buf == NULL || acc == NULL || pad == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t nb = 0; nb < NB; nb++) {
            if (buf == NULL || acc == NULL || pad == NULL) continue;
            int64_t n0 = R * nb, nn = N - n0 < R ? N - n0 : R;
            memset(acc, 0, sizeof(float) * (size_t)(R * Mp));
            for (int64_t k0 = 0; k0 < K; k0 += FMA_KC) {
                int64_t kc = K - k0 < FMA_KC ? K - k0 : FMA_KC;
                for (int64_t i = 0; i < nn; i++) {
                    int64_t o = n0 + i;
                    const uint8_t *row = qweight + o * row_bytes;
                    if (o == N - 1) { /* loads may run 3 bytes past the last row */
                        memcpy(pad, row, (size_t)row_bytes);
                        row = pad;
                    }
                    const uint16_t *s = scales + o * groups, *z = zeros + o * groups;
                    float *d = buf + i * kc;
                    switch (bits) {
                        case 1: fma_dequantize_cols(row, s, z, d, k0, kc, group_size, 1); break;
                        case 2: fma_dequantize_cols(row, s, z, d, k0, kc, group_size, 2); break;
                        case 3: fma_dequantize_cols(row, s, z, d, k0, kc, group_size, 3); break;
                        case 4: fma_dequantize_cols(row, s, z, d, k0, kc, group_size, 4); break;
                        default: fma_dequantize_cols(row, s, z, d, k0, kc, group_size, 8); break;
                    }
                }
                if (nn < R) memset(buf + nn * kc, 0, sizeof(float) * (size_t)((R - nn) * kc));
                for (int64_t t = 0; t < M8; t += 2) {
                    const float *x0 = xv + (t * K + k0) * 8, *x1 = x0 + K * 8;
                    for (int64_t r0 = 0; r0 < nn; r0 += 6) {
                        if (t + 1 < M8)
                            fma8_tile(buf + r0 * kc, kc, x0, x1, kc, acc + r0 * Mp + 8 * t, Mp, 2);
                        else
                            fma8_tile(buf + r0 * kc, kc, x0, x0, kc, acc + r0 * Mp + 8 * t, Mp, 1);
                    }
                }
            }
            for (int64_t m = 0; m < M; m++)
                for (int64_t r = 0; r < nn; r++) y[m * ldy + n0 + r] = acc[r * Mp + m];
        }
        free(buf);
        free(acc);
        free(pad);
    }
    free(xv);
    return failed ? -2 : 0;
}
#endif

/* 1 if mc_fma_linear is built (AVX2 + FMA + F16C). */
int mc_fma_available(void) {
#ifdef MC_HAVE_FMA_LINEAR
    return 1;
#else
    return 0;
#endif
}

/* y rows have stride ldy floats. Returns 0, -1 (not built, or shapes it does not take), -2 when out of memory. */
int mc_fma_linear(const float *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                  const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy, int threads) {
#ifdef MC_HAVE_FMA_LINEAR
    return fma_linear(x, M, K, qweight, scales, zeros, N, bits, group_size, y, ldy, threads);
#else
    (void)x, (void)M, (void)K, (void)qweight, (void)scales, (void)zeros, (void)N, (void)bits, (void)group_size;
    (void)y, (void)ldy, (void)threads;
    return -1;
#endif
}

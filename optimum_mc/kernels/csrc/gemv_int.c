/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * integer-dot GEMVs. */

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

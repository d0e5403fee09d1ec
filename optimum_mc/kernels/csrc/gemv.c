/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * the fp32 GEMV for a few rows of x. */

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

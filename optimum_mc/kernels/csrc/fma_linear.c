/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * prefill with AVX2 + FMA (after dequantize.c). */

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

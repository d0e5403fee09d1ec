/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * bf16 prefill with AVX512-BF16 (after dequantize_bf16.c). */

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
    (f32 ? dequantize_cols(row, s, z, d, k0, kc, group_size, consts, 32, B, 1)                                     \
         : dequantize_cols(row, s, z, d, k0, kc, group_size, consts, 32, B, 0))
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

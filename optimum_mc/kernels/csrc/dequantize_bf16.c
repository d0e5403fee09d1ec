/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * dequantization to bf16 (after gemv.c: uses GEMV_PREFETCH). */

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

/* One row of codes as bf16 into dst, in blocks of 32 weights kstride apart: weight k at dst[(k / 32) * kstride + k % 32]
 * (kstride 32: the row as it is; the AMX kernel's tile layout: 1024, i.e. 32 rows of 32 weights per block). */
static inline __attribute__((always_inline)) void dequantize_row_bf16(const uint8_t *row, const uint16_t *s16,
                                                                      const uint16_t *z16, uint16_t *dst,
                                                                      int64_t in_f, int64_t group_size,
                                                                      int64_t kstride, const int BITS) {
    int64_t groups = in_f / group_size, chunks = group_size / 16;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *src = row + g * group_size * BITS / 8;
        _mm_prefetch((const char *)src + GEMV_PREFETCH, _MM_HINT_T0);
        __m512 vs = _mm512_set1_ps(half_to_float(s16[g])), vz = _mm512_set1_ps(half_to_float(z16[g]));
        for (int64_t c = 0; c < chunks; c++) {
            int64_t k = g * group_size + 16 * c;
            __m512 w = _mm512_mul_ps(_mm512_sub_ps(codes16(src, c, BITS), vz), vs);
            _mm256_storeu_si256((__m256i *)(dst + k / 32 * kstride + k % 32), (__m256i)_mm512_cvtneps_pbh(w));
        }
    }
}

/* Table-lookup dequantization to bf16 with AVX512-VBMI (the AMX and AVX512-BF16 prefill kernels). */
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
 * into dst as bf16 (F32 = 0; blocks of 32 kstride apart: column k at (k - k0) / 32 * kstride + k % 32) or as fp32
 * (F32 = 1, contiguous). */
static inline __attribute__((always_inline)) void dequantize_cols(const uint8_t *row, const uint16_t *s16,
                                                                  const uint16_t *z16, void *dst, int64_t k0,
                                                                  int64_t kc, int64_t group_size,
                                                                  const void *consts, int64_t kstride,
                                                                  const int BITS, const int F32) {
    _mm_prefetch((const char *)(row + (k0 + kc) * BITS / 8), _MM_HINT_T0); /* this row's next block */
    _mm_prefetch((const char *)(row + (k0 + kc) * BITS / 8 + 64), _MM_HINT_T0);
    /* group by group: one 64-bit division per group, not per 32 columns (the AMX kernel on a 7168 x 1024 2-bit
     * matrix and 16 rows of x, where dequantizing is most of the time, one thread: 1.32 -> 1.03 ms); dst advances
     * 32 columns at a time */
    uint16_t *db = (uint16_t *)dst;
    float *df = (float *)dst;
    for (int64_t ks = k0; ks < k0 + kc;) {
        int64_t g = ks / group_size, ke = (g + 1) * group_size < k0 + kc ? (g + 1) * group_size : k0 + kc;
        __m512 vs = _mm512_set1_ps(half_to_float(s16[g])), vz = _mm512_set1_ps(half_to_float(z16[g]));
#ifdef __AVX512VBMI__
        if (BITS <= 4) {
            const codes_consts *cc = (const codes_consts *)consts;
            /* the 2^BITS weights of this group rounded to bf16, repeated over the lanes */
            __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_castsi512_ps(cc->q), vz), vs);
            __m512i table = F32 ? _mm512_castps_si512(round_bf16_ps(w))
                                : _mm512_broadcast_i64x4((__m256i)_mm512_cvtneps_pbh(w));
            for (int64_t k = ks; k < ke; k += 32) {
                const uint8_t *src = row + k * BITS / 8;
                if (F32) {
                    for (int h = 0; h < 2; h++) {
                        __m512i v = _mm512_maskz_loadu_epi8((__mmask64)((1ULL << (2 * BITS)) - 1), src + 2 * BITS * h);
                        v = _mm512_multishift_epi64_epi8(cc->ctl, _mm512_permutexvar_epi8(cc->perm, v));
                        _mm512_storeu_ps(df + 16 * h, _mm512_permutexvar_ps(v, _mm512_castsi512_ps(table)));
                    }
                    df += 32;
                } else {
                    __m512i v = _mm512_maskz_loadu_epi8((__mmask64)((1ULL << (4 * BITS)) - 1), src);
                    v = _mm512_multishift_epi64_epi8(cc->ctl, _mm512_permutexvar_epi8(cc->perm, v));
                    _mm512_storeu_si512((void *)db, _mm512_permutexvar_epi16(v, table));
                    db += kstride;
                }
            }
            ks = ke;
            continue;
        }
#endif
        for (int64_t k = ks; k < ke; k += 32) {
            const uint8_t *src = row + k * BITS / 8; /* codes16(src, c): codes 16c .. 16c + 15 from src */
            for (int64_t c = 0; c < 2; c++) {
                __m512 w = _mm512_mul_ps(_mm512_sub_ps(codes16(src, c, BITS), vz), vs);
                if (F32)
                    _mm512_storeu_ps(df + 16 * c, round_bf16_ps(w));
                else
                    _mm256_storeu_si256((__m256i *)(db + 16 * c), (__m256i)_mm512_cvtneps_pbh(w));
            }
            df += 32;
            db += kstride;
        }
        ks = ke;
    }
    (void)consts;
}

#endif

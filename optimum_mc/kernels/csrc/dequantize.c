/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * exact fp32 dequantization. */

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

/* Fast CPU kernels for optimum-mc's packed low-bit weights (docs/format.md).
 *
 * Hand-written because no library reads our packed 1/2/3-bit layout. Plain C (no torch headers), compiled on
 * first use by kernels/cpu.py and called through ctypes.
 *
 * Layout: codes of one row form a little-endian bit stream in int32 words; code i occupies stream bits
 * [i*bits, (i+1)*bits). A code dequantizes to (q - zero[g]) * scale[g] with g = i / group_size.
 *
 * GEMV (decode): sum_k x_k * q_k is linear in the bits of the stream, so for every stream byte j a 256-entry
 * table T[j][v] = sum_{bit p set in v} x[(8j+p)/bits] * 2^((8j+p)%bits) turns 8/bits multiply-adds into one
 * lookup; y[o] = sum_g scale[o,g] * (sum_{bytes j of g} T[j][byte] - zero[o,g] * sum_{k in g} x_k).
 * Groups are whole bytes because group_size is a multiple of 32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint32_t code_at(const uint32_t *row, int64_t i, int bits) {
    int64_t pos = i * bits;
    int64_t word = pos >> 5;
    int shift = (int)(pos & 31);
    uint32_t v = row[word] >> shift;
    if (shift + bits > 32) v |= row[word + 1] << (32 - shift);
    return v & ((1u << bits) - 1u);
}

/* out[o, i] = (q - zero) * scale, fp32 */
void mc_dequantize(const int32_t *qweight, const float *scales, const float *zeros, float *out, int64_t out_f,
                   int64_t in_f, int bits, int64_t group_size) {
    int64_t words = in_f * bits / 32;
    int64_t groups = in_f / group_size;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out_f; o++) {
        const uint32_t *row = (const uint32_t *)(qweight + o * words);
        float *dst = out + o * in_f;
        for (int64_t g = 0; g < groups; g++) {
            float s = scales[o * groups + g], z = zeros[o * groups + g];
            for (int64_t i = g * group_size; i < (g + 1) * group_size; i++) {
                float q = (float)code_at(row, i, bits);
                float d = q - z;
                dst[i] = d * s;
            }
        }
    }
}

/* y[m, o] = sum_i x[m, i] * W[o, i] for m < M (small M), via per-byte lookup tables. */
void mc_gemv_lut(const float *x, const int32_t *qweight, const float *scales, const float *zeros, float *y,
                 int64_t M, int64_t out_f, int64_t in_f, int bits, int64_t group_size) {
    int64_t row_bytes = in_f * bits / 8;
    int64_t groups = in_f / group_size;
    int64_t gbytes = group_size * bits / 8;
    float *table = (float *)malloc(sizeof(float) * 256 * row_bytes);
    float *xsum = (float *)malloc(sizeof(float) * groups);
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * in_f;
#pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < row_bytes; j++) {
            float w[8];
            for (int p = 0; p < 8; p++) {
                int64_t pos = 8 * j + p;
                w[p] = xm[pos / bits] * (float)(1u << (pos % bits));
            }
            float *t = table + 256 * j;
            t[0] = 0.0f;
            for (int v = 1; v < 256; v++) t[v] = t[v & (v - 1)] + w[__builtin_ctz(v)];
        }
        for (int64_t g = 0; g < groups; g++) {
            float acc = 0.0f;
            for (int64_t i = g * group_size; i < (g + 1) * group_size; i++) acc += xm[i];
            xsum[g] = acc;
        }
        float *ym = y + m * out_f;
        int64_t blocks = (out_f + 3) / 4;
#pragma omp parallel for schedule(static)
        for (int64_t ob = 0; ob < blocks; ob++) {
            /* four rows at a time: independent accumulators keep the load ports busy */
            int64_t o0 = ob * 4;
            int nr = (int)(out_f - o0 < 4 ? out_f - o0 : 4);
            const uint8_t *rows[4];
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int r = 0; r < 4; r++) rows[r] = (const uint8_t *)(qweight) + (o0 + (r < nr ? r : 0)) * row_bytes;
            for (int64_t g = 0; g < groups; g++) {
                const float *t = table + 256 * g * gbytes;
                const uint8_t *b0 = rows[0] + g * gbytes, *b1 = rows[1] + g * gbytes;
                const uint8_t *b2 = rows[2] + g * gbytes, *b3 = rows[3] + g * gbytes;
                float p0 = 0.0f, p1 = 0.0f, p2 = 0.0f, p3 = 0.0f;
                for (int64_t j = 0; j < gbytes; j++) {
                    const float *tj = t + 256 * j;
                    p0 += tj[b0[j]];
                    p1 += tj[b1[j]];
                    p2 += tj[b2[j]];
                    p3 += tj[b3[j]];
                }
                float ps[4] = {p0, p1, p2, p3};
                for (int r = 0; r < nr; r++) {
                    int64_t o = o0 + r;
                    acc[r] += scales[o * groups + g] * (ps[r] - zeros[o * groups + g] * xsum[g]);
                }
            }
            for (int r = 0; r < nr; r++) ym[o0 + r] = acc[r];
        }
    }
    free(table);
    free(xsum);
}

/* 8-bit GEMV: one code per byte, so a direct multiply-add beats a table. */
void mc_gemv_8bit(const float *x, const int32_t *qweight, const float *scales, const float *zeros, float *y,
                  int64_t M, int64_t out_f, int64_t in_f, int64_t group_size) {
    int64_t groups = in_f / group_size;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * in_f;
#pragma omp parallel for schedule(static)
        for (int64_t o = 0; o < out_f; o++) {
            const uint8_t *row = (const uint8_t *)(qweight) + o * in_f;
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                float dot = 0.0f, xs = 0.0f;
                for (int64_t i = g * group_size; i < (g + 1) * group_size; i++) {
                    dot += xm[i] * (float)row[i];
                    xs += xm[i];
                }
                acc += scales[o * groups + g] * (dot - zeros[o * groups + g] * xs);
            }
            y[m * out_f + o] = acc;
        }
    }
}

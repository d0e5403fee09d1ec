/* The C kernels' interface: every entry point kernels/cpu.py loads through ctypes (its load() declares the same
 * signatures) and the epilogue descriptor the prefill kernels share. mc_kernels.c includes this header before the
 * files that define these functions, so the compiler checks every definition against its declaration.
 *
 * Conventions: packed matrices as docs/format.md (int32 words read as little-endian bytes, fp16 scales / zeros as
 * uint16_t); bf16 as uint16_t; `threads`: OpenMP threads; return 0 on success, -2 when a buffer could not be
 * allocated, -3 (mc_moe_decode) for an expert index outside [0, E], other negatives for shapes a kernel does not take.
 */
#ifndef MC_KERNELS_H
#define MC_KERNELS_H
#include <stdint.h>

/* Where a prefill kernel's fp32 sums go (csrc/moe_epilogue.c; kernels/moe_prefill.py's Epilogue mirrors it). */
typedef struct {
    int32_t mode, act, out_bf16, reserved;
    int64_t inter, ld; /* GLU: I; the row stride of out, in elements */
    void *out;         /* STORE: y fp32; GLU: h fp32 / bf16; SCATTER: the tokens' fp32 rows */
    const float *bias; /* GLU: 2I (gate, then up); SCATTER: N; or NULL */
    const float *weight;
    const int64_t *dst; /* SCATTER: routing weight and token row of each row of x */
} mc_epi;

/* dequantize.c, dequantize_bf16.c: rows of a packed matrix to fp32 (the reference's rounding) / bf16 */
int mc_dequantize(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, float *out, int64_t rows,
                  int64_t in_f, int bits, int64_t group_size, int threads);
int mc_dequantize_bf16(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, uint16_t *out,
                       int64_t rows, int64_t in_f, int bits, int64_t group_size, int threads);

/* gemv.c, gemv_int.c: y (M, out_f) = x (M, in_f) @ W^T for a few rows (decode); _i8: int8 activations */
int mc_gemv(const float *x, const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, float *y,
            int64_t M, int64_t out_f, int64_t in_f, int bits, int64_t group_size, int threads);
int mc_gemv_i8(const float *x, const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, float *y,
               int64_t M, int64_t out_f, int64_t in_f, int bits, int64_t group_size, int threads);
int mc_i8dot_available(void);

/* moe_gemv.c: the grouped GEMV over a layer's experts (rows start[e] .. start[e] + count[e] of x per expert) */
int mc_moe_gemv(const float *x, const int64_t *qptr, const int64_t *sptr, const int64_t *zptr, const int32_t *bits,
                const int64_t *start, const int64_t *count, int64_t E, float *y, int64_t out_f, int64_t in_f,
                int64_t group_size, int threads, int int8_act);

/* moe_decode.c: a whole MoE layer for a few tokens (routing, ODP's rule and counts, activation, biases) */
int mc_moe_decode(const float *x, int64_t T, int64_t K, const int64_t *idx_in, const float *w_in, const int64_t *gq,
                  const int64_t *gs, const int64_t *gz, const int64_t *dq, const int64_t *ds, const int64_t *dz,
                  const int32_t *bits, int64_t E, int64_t H, int64_t I, int64_t group_gu, int64_t group_dn, int act,
                  float *out, int threads, float odp_threshold, int64_t *odp_counts, int int8_act,
                  const float *gu_bias, const float *dn_bias);

/* moe_epilogue.c: a projection's sums through the MoE prefill epilogue */
int mc_moe_epilogue(const mc_epi *ep, const float *y, int64_t ldy, int64_t M, int64_t N, int threads);

/* amx_linear.c, bf16_linear.c, fma_linear.c: prefill y (M, N) = x (M, K) @ W^T; *_available: built and usable */
int mc_amx_available(void);
int mc_amx_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                  const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy, int threads);
int mc_amx_linear_epi(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                      const uint16_t *zeros, int64_t N, int bits, int64_t group_size, const mc_epi *ep, int threads);
int mc_bf16_available(void);
int mc_bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                   const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy, int threads);
int mc_bf16_linear_fma(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                       const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy,
                       int threads);
int mc_fma_available(void);
int mc_fma_linear(const float *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                  const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy, int threads);

#endif

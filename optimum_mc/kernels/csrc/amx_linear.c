/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * bf16 prefill on AMX (after dequantize_bf16.c). */

/* ---------------------------------------------------------------------------------------------------------------
 * Prefill with bf16 activations on AMX: y (M, N) fp32 = x (M, K) bf16 @ W.T, W (N, K) packed, with W dequantized
 * into bf16 32 rows at a time (a block that stays in L2) and fed straight to the tile unit, never written out whole.
 * The tiles compute y.T = W @ x.T: W's dequantized rows are the A operand (16 rows x 32 k; dequantized into a tile
 * layout where each A tile is 1 KiB in one piece), x is re-laid once per call into the pair-interleaved B layout
 * (16 k-pairs x 16 rows of x). When x is larger than AMX_L2_BYTES (the down projection of an expert with 512
 * rows: 3.5 MiB), a work item takes several 32-row blocks of W, so each 32 rows of x read from L3 serve all of
 * them (measured on that shape, one thread: 5.1 ms instead of 10.2 / 5.9 with one block per item, oneDNN bf16
 * 4.5). Same rounding as dequantizing into bf16 and calling bf16 BLAS: (q - zero) * scale in fp32 rounded to bf16
 * (nearest even), products summed in fp32. Returns -1 where the CPU or the build has no AMX (the caller then uses
 * BLAS).
 * mc_amx_linear_epi hands each 32 x 32 block of sums, while in L1, to an epilogue (moe_epilogue.c): the MoE
 * prefill's activation (gate/up) or weighted scatter-add into the tokens' rows (down).
 * ------------------------------------------------------------------------------------------------------------- */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define MC_HAVE_AMX 1
#ifndef AMX_L2_BYTES
#define AMX_L2_BYTES (1 << 20) /* x larger than this takes several weight sub-blocks per work item, up to this much */
#endif
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

/* Rows first .. first + count of W as bf16 into dst in the tile layout: block kb (32 inputs) of row i at
 * dst + kb * 1024 + i * 32, so each 16 x 32 A tile is 1 KiB in one piece (rows K * 2 bytes apart would share a few
 * L1 sets). Groups of whole 32-input blocks go through dequantize_cols (with AVX512-VBMI a table lookup, 3x fewer
 * instructions: at 128 rows of x the dequantization is most of an expert's time), others dequantize_row_bf16;
 * both compute bf16((q - zero) * scale) with the same fp32 operations. consts: codes_init(bits, 32) or NULL. */
static void dequantize_rows_bf16(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros,
                                 uint16_t *dst, int64_t first, int64_t count, int64_t rows, int64_t in_f, int bits,
                                 int64_t group_size, const void *consts, uint8_t *pad) {
    int64_t row_bytes = in_f * bits / 8, groups = in_f / group_size;
    for (int64_t i = 0; i < count; i++) {
        int64_t o = first + i;
        const uint8_t *row = row_ptr(qweight, o, rows, row_bytes, pad);
        const uint16_t *s = scales + o * groups, *z = zeros + o * groups;
        uint16_t *d = dst + i * 32;
        if (group_size % 32 == 0) {
#define MC_DQ_TILES(B) dequantize_cols(row, s, z, d, 0, in_f, group_size, consts, 1024, B, 0)
            switch (bits) {
                case 1: MC_DQ_TILES(1); break;
                case 2: MC_DQ_TILES(2); break;
                case 3: MC_DQ_TILES(3); break;
                case 4: MC_DQ_TILES(4); break;
                default: MC_DQ_TILES(8); break;
            }
#undef MC_DQ_TILES
            continue;
        }
        switch (bits) {
            case 1: dequantize_row_bf16(row, s, z, d, in_f, group_size, 1024, 1); break;
            case 2: dequantize_row_bf16(row, s, z, d, in_f, group_size, 1024, 2); break;
            case 3: dequantize_row_bf16(row, s, z, d, in_f, group_size, 1024, 3); break;
            case 4: dequantize_row_bf16(row, s, z, d, in_f, group_size, 1024, 4); break;
            default: dequantize_row_bf16(row, s, z, d, in_f, group_size, 1024, 8); break;
        }
    }
}
#endif

#ifdef MC_HAVE_AMX
/* dst[r * 16 + i] = src[i * ld + r] for i < valid (0 for the rows past them), r < 16: a 16 x 16 transpose of 32-bit
 * words (bf16 pairs) in registers (32-bit, then 64-bit unpacks within 128-bit lanes, then two lane shuffles). */
static inline void transpose16_u32(const uint32_t *src, int64_t ld, int64_t valid, uint32_t *dst) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = i < valid ? _mm512_loadu_si512((const void *)(src + i * ld)) : _mm512_setzero_si512();
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* r[i + j]: word j of each lane, rows i .. i + 3 */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; j++) { /* column 4 L + j = lane L of r[j], r[4 + j], r[8 + j], r[12 + j] */
        __m512i v0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), v1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);
        __m512i v2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
        __m512i v3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
        _mm512_storeu_si512((void *)(dst + (0 + j) * 16), _mm512_shuffle_i32x4(v0, v2, 0x88));
        _mm512_storeu_si512((void *)(dst + (8 + j) * 16), _mm512_shuffle_i32x4(v0, v2, 0xDD));
        _mm512_storeu_si512((void *)(dst + (4 + j) * 16), _mm512_shuffle_i32x4(v1, v3, 0x88));
        _mm512_storeu_si512((void *)(dst + (12 + j) * 16), _mm512_shuffle_i32x4(v1, v3, 0xDD));
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

/* y = x @ W.T with the sums going through the epilogue ep (moe_epilogue.c). GLU: N = 2 * ep->inter, and each work
 * item takes 16 gate rows and the 16 up rows of the same columns (ep->inter % 16 == 0), so both halves of a column
 * are in the same tiles. Returns 0, -1 (no AMX, or shapes it does not take), -2 when out of memory. */
static int amx_linear_epi(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                          const uint16_t *zeros, int64_t N, int bits, int64_t group_size, const mc_epi *ep,
                          int threads) {
#ifdef MC_HAVE_AMX
    const int glu = ep->mode == MC_EPI_GLU;
    if (M < 1 || N < 1 || K % 32 || group_size % 16 || K % group_size || gemv_range(bits, 1) == NULL) return -1;
    if (glu && (N != 2 * ep->inter || ep->inter % 16)) return -1;
    int64_t Mp = (M + 31) / 32 * 32, KB = K / 32, NB = (N + 31) / 32;
    /* x in the B layout: block (m16, kb) is 16 rows r x 16 columns i of bf16 pairs x[16*m16 + i][32*kb + 2r + {0,1}] */
    uint32_t *xv = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)(Mp * K / 2));
    if (xv == NULL) return -2;
    const uint32_t *x32 = (const uint32_t *)x;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && Mp * K >= (1 << 18))
    for (int64_t m16 = 0; m16 < Mp / 16; m16++) {
        int64_t valid = M - 16 * m16 < 16 ? M - 16 * m16 : 16;
        for (int64_t kb = 0; kb < KB; kb++)
            transpose16_u32(x32 + 16 * m16 * (K / 2) + 16 * kb, K / 2, valid, xv + (m16 * KB + kb) * 256);
    }
    const void *consts = NULL;
#ifdef __AVX512VBMI__
    codes_consts cc = codes_init(bits <= 4 ? bits : 4, 32);
    consts = &cc;
#endif
    int failed = 0;
    /* With more rows of x than fit in L2 next to a weight block (the down projection of 512 tokens: 3.5 MiB),
     * each work item takes SB sub-blocks of 32 weight rows (up to 1 MiB of them), so every 32 rows of x, read from
     * L3 once per work item, serve SB sub-blocks from L2: SB times less traffic than one sub-block per item. */
    const int64_t NS = NB, fit = AMX_L2_BYTES / (64 * K); /* sub-blocks of 32 x K bf16 in AMX_L2_BYTES */
    const int64_t SB = Mp * K * 2 <= AMX_L2_BYTES || fit < 1 ? 1 : (fit > 8 ? 8 : fit);
    const int64_t NI = (NS + SB - 1) / SB;
#pragma omp parallel num_threads(threads) if (threads > 1 && NI > 1 && M * N * K >= (1 << 24))
    {
        uint16_t *buf = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (size_t)(SB * 32 * K));
        uint8_t *pad = (uint8_t *)malloc((size_t)(K * bits / 8) + 8);
        float acc[32 * 32] __attribute__((aligned(64))), res[16 * 32];
        if (buf == NULL || pad == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            amx_configure();
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < NI; it++) {
            if (buf == NULL || pad == NULL) continue;
            int64_t s0 = it * SB, ns = NS - s0 < SB ? NS - s0 : SB;
            for (int64_t j = 0; j < ns; j++) {
                /* sub-block s0 + j of W in buf + j * 32 * K (tile layout): rows [n0, n0 + nn) (GLU: gate
                 * [n0, n0 + 16) then up [I + n0, ..) at row 16) */
                uint16_t *bj = buf + j * 32 * K;
                int64_t nb = s0 + j, n0 = glu ? 16 * nb : 32 * nb, nn = N - n0 < 32 ? N - n0 : 32;
                if (glu) {
                    dequantize_rows_bf16(qweight, scales, zeros, bj, n0, 16, N, K, bits, group_size, consts, pad);
                    dequantize_rows_bf16(qweight, scales, zeros, bj + 16 * 32, ep->inter + n0, 16, N, K, bits,
                                         group_size, consts, pad);
                } else {
                    dequantize_rows_bf16(qweight, scales, zeros, bj, n0, nn, N, K, bits, group_size, consts, pad);
                    for (int64_t kb = 0; nn < 32 && kb < KB; kb++)
                        memset(bj + kb * 1024 + nn * 32, 0, sizeof(uint16_t) * (size_t)((32 - nn) * 32));
                }
            }
            for (int64_t m32 = 0; m32 < Mp / 32; m32++) {
                const uint32_t *b0 = xv + (2 * m32) * KB * 256, *b1 = xv + (2 * m32 + 1) * KB * 256;
                int64_t m0 = 32 * m32, mm = M - m0 < 32 ? M - m0 : 32;
                for (int64_t j = 0; j < ns; j++) {
                    const uint16_t *bj = buf + j * 32 * K;
                    int64_t nb = s0 + j, n0 = glu ? 16 * nb : 32 * nb, nn = N - n0 < 32 ? N - n0 : 32;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t kb = 0; kb < KB; kb++) {
                        _tile_loadd(4, bj + kb * 1024, 64);
                        _tile_loadd(5, bj + kb * 1024 + 512, 64);
                        _tile_loadd(6, b0 + kb * 256, 64);
                        _tile_loadd(7, b1 + kb * 256, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    /* tile t: W rows 16 * (t / 2) + i, x rows 16 * (t % 2) + j
                     * -> acc[(16 * (t / 2) + i) * 32 + 16 * (t % 2) + j] */
                    _tile_stored(0, acc, 128);
                    _tile_stored(1, acc + 16, 128);
                    _tile_stored(2, acc + 16 * 32, 128);
                    _tile_stored(3, acc + 16 * 32 + 16, 128);
                    if (glu)
                        epi_glu_block(ep, acc, acc + 16 * 32, 32, n0, 16, m0, mm, res);
                    else
                        epi_rows(ep, acc, 32, n0, nn, m0, mm);
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
    (void)ep, (void)threads;
    return -1;
#endif
}

/* y rows have stride ldy floats. Returns 0, -1 (no AMX, or shapes it does not take), -2 when out of memory. */
int mc_amx_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                  const uint16_t *zeros, int64_t N, int bits, int64_t group_size, float *y, int64_t ldy,
                  int threads) {
    mc_epi ep = {MC_EPI_STORE, 0, 0, 0, 0, ldy, y, NULL, NULL, NULL};
    return amx_linear_epi(x, M, K, qweight, scales, zeros, N, bits, group_size, &ep, threads);
}

/* The same with an epilogue (moe_epilogue.c): the MoE prefill's gate/up (GLU) and down (SCATTER) projections. */
int mc_amx_linear_epi(const uint16_t *x, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                      const uint16_t *zeros, int64_t N, int bits, int64_t group_size, const mc_epi *ep,
                      int threads) {
    if (ep->mode != MC_EPI_STORE && ep->mode != MC_EPI_GLU && ep->mode != MC_EPI_SCATTER) return -1;
    return amx_linear_epi(x, M, K, qweight, scales, zeros, N, bits, group_size, ep, threads);
}

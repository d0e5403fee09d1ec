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
 *
 * Files, by concern (one translation unit: this file includes the others, in this order, so every helper stays
 * inlinable across kernels and the build is one compiler call; kernels/cpu.py hashes every file of csrc/ into the
 * cache key):
 *   mc_kernels.h       the interface: every exported entry point's declaration (what kernels/cpu.py loads), mc_epi
 *   common.h           includes, fp16 -> fp32, unaligned loads, the padded last row
 *   dequantize.c       mc_dequantize (exact fp32, the reference's rounding)
 *   gemv.c             the fp32 GEMV for a few rows of x (decode), per bit-width specializations
 *   dequantize_bf16.c  mc_dequantize_bf16 and the bf16 row dequantization the prefill kernels share
 *   gemv_int.c         integer-dot GEMVs (int8 activations, fp32 by limbs) on AVX512-VNNI/VBMI, portable fallback
 *   moe_gemv.c         mc_moe_gemv: grouped GEMV over the experts of a layer
 *   moe_decode.c       mc_moe_decode: a whole MoE layer for a few tokens in one call (routing, ODP, activation)
 *   moe_epilogue.c     mc_moe_epilogue: the MoE prefill's activation / weighted scatter-add of a projection's sums
 *   amx_linear.c       mc_amx_linear: bf16 prefill on the AMX tile unit
 *   bf16_linear.c      mc_bf16_linear / mc_bf16_linear_fma: bf16 prefill with AVX512-BF16 (no AMX)
 *   fma_linear.c       mc_fma_linear: prefill with AVX2 + FMA on exactly dequantized fp32 weights
 */
#include "common.h"
#include "mc_kernels.h"
#include "dequantize.c"
#include "gemv.c"
#include "dequantize_bf16.c"
#include "gemv_int.c"
#include "moe_gemv.c"
#include "moe_decode.c"
#include "moe_epilogue.c"
#include "amx_linear.c"
#include "bf16_linear.c"
#include "fma_linear.c"

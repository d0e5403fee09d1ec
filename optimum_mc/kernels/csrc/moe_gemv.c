/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * the grouped MoE GEMV (after gemv.c, gemv_int.c). */

/* ---------------------------------------------------------------------------------------------------------------
 * Grouped GEMV for a mixture of experts: the rows of x routed to expert e are rows [start[e], start[e] + count[e])
 * of x (sorted by expert); y rows correspond. Expert e's packed matrix (out_f, in_f) at bits[e] sits at
 * qptr[e] / sptr[e] / zptr[e]. Work items are (expert, block of BLOCK_ROWS output rows), spread over threads, so
 * every expert's weights are read once per call whatever the bit-width mix. Experts with count 0 cost nothing.
 * ------------------------------------------------------------------------------------------------------------- */
#define MOE_BLOCK_ROWS 64
/* weights x rows below which one thread does it all: waking a second thread costs more than it saves there */
#define MOE_PARALLEL_WORK (1 << 21)

/* The work items of a grouped MoE GEMV, e * blocks + b for block b (MOE_BLOCK_ROWS output rows) of every expert
 * with rows; *items their number, *rows the rows of x they read (the largest start + count), *work the weights
 * times rows. NULL when there are none (*items = 0) or when out of memory. */
static int64_t *moe_items(const int64_t *start, const int64_t *count, int64_t E, int64_t blocks, int64_t weights,
                          int64_t *items, int64_t *rows, int64_t *work) {
    *items = *rows = *work = 0;
    for (int64_t e = 0; e < E; e++) {
        if (count[e] <= 0) continue;
        *rows = start[e] + count[e] > *rows ? start[e] + count[e] : *rows;
        *items += blocks;
        *work += count[e] * weights;
    }
    int64_t *item_expert = *items ? (int64_t *)malloc(sizeof(int64_t) * (size_t)*items) : NULL;
    for (int64_t e = 0, n = 0; item_expert != NULL && e < E; e++)
        for (int64_t b = 0; count[e] > 0 && b < blocks; b++) item_expert[n++] = e * blocks + b;
    return item_expert;
}

/* mc_moe_gemv by integer dots with `limbs` (see gemv_int): the rows of x are prepared once, then the same work
 * items. */
static int moe_gemv_int(const float *x, const int64_t *qptr, const int64_t *sptr, const int64_t *zptr,
                        const int32_t *bits, const int64_t *start, const int64_t *count, int64_t E, float *y,
                        int64_t out_f, int64_t in_f, int64_t group_size, int threads, int limbs) {
    int64_t groups = in_f / group_size, items, P, work, blocks = (out_f + MOE_BLOCK_ROWS - 1) / MOE_BLOCK_ROWS;
    for (int64_t e = 0; e < E; e++)
        if (count[e] > 0 && i8_range(bits[e], 1, group_size, limbs) == NULL) return -1;
    int64_t *item_expert = moe_items(start, count, E, blocks, out_f * in_f, &items, &P, &work);
    if (items == 0) return 0;
    int_x bx = {0};
    int rc = item_expert == NULL || int_x_alloc(&bx, P, in_f, groups, limbs) ? -2 : 0;
    if (rc == 0) {
        for (int64_t e = 0; e < E; e++) {
            if (count[e] <= 0) continue;
            int64_t r = start[e];
            prepare_x_i8(x + r * in_f, bx.xq + r * in_f, bx.sx + r * groups, bx.xqsf + r * groups, bx.nlimb + r * groups,
                         count[e], in_f, group_size, limbs, bx.limb_stride);
        }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && work >= MOE_PARALLEL_WORK)
        for (int64_t it = 0; it < items; it++) {
            int64_t e = item_expert[it] / blocks, b = item_expert[it] % blocks;
            int64_t begin = b * MOE_BLOCK_ROWS, end = begin + MOE_BLOCK_ROWS < out_f ? begin + MOE_BLOCK_ROWS : out_f;
            float *fr = (float *)malloc(sizeof(float) * (size_t)(4 * groups));
            if (fr == NULL) {
#pragma omp atomic write
                rc = -2;
                continue;
            }
            for (int64_t m0 = 0; m0 < count[e]; m0 += 4) {
                int64_t mm = count[e] - m0 < 4 ? count[e] - m0 : 4, r = start[e] + m0;
                i8_args a = int_x_args(&bx, r, (const uint8_t *)(intptr_t)qptr[e], (const uint16_t *)(intptr_t)sptr[e],
                                       (const uint16_t *)(intptr_t)zptr[e], y + r * out_f, out_f, in_f, group_size, fr);
                i8_range(bits[e], mm, group_size, limbs)(&a, begin, end);
            }
            free(fr);
        }
    }
    free(item_expert);
    int_x_free(&bx);
    return rc;
}

/* Returns 0, -1 for an unsupported bit-width, -2 when out of memory. */
int mc_moe_gemv(const float *x, const int64_t *qptr, const int64_t *sptr, const int64_t *zptr, const int32_t *bits,
                const int64_t *start, const int64_t *count, int64_t E, float *y, int64_t out_f, int64_t in_f,
                int64_t group_size, int threads, int int8_act) {
    if (int8_act) return moe_gemv_int(x, qptr, sptr, zptr, bits, start, count, E, y, out_f, in_f, group_size, threads, 1);
    if (i8_range(2, 1, group_size, 4) != NULL) /* fp32: four-limb integer dots where the vector kernel exists */
        return moe_gemv_int(x, qptr, sptr, zptr, bits, start, count, E, y, out_f, in_f, group_size, threads, 4);
    int64_t groups = in_f / group_size, items, P, work, blocks = (out_f + MOE_BLOCK_ROWS - 1) / MOE_BLOCK_ROWS;
    for (int64_t e = 0; e < E; e++)
        if (count[e] > 0 && gemv_range(bits[e], 1) == NULL) return -1;
    int64_t *item_expert = moe_items(start, count, E, blocks, out_f * in_f, &items, &P, &work);
    if (items == 0) return 0;
    float *xs = (float *)malloc(sizeof(float) * (size_t)(P * in_f));
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(P * groups));
    int rc = (xs == NULL || xsum == NULL || item_expert == NULL) ? -2 : 0;
    if (rc == 0) {
        for (int64_t e = 0; e < E; e++) {
            if (count[e] <= 0) continue;
            prepare_x(x + start[e] * in_f, xs + start[e] * in_f, xsum + start[e] * groups, count[e], in_f, bits[e],
                      group_size);
        }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && work >= MOE_PARALLEL_WORK)
        for (int64_t it = 0; it < items; it++) {
            int64_t e = item_expert[it] / blocks, b = item_expert[it] % blocks;
            int64_t begin = b * MOE_BLOCK_ROWS, end = begin + MOE_BLOCK_ROWS < out_f ? begin + MOE_BLOCK_ROWS : out_f;
            int eb = bits[e];
            uint8_t *pad = NULL;
            if (end == out_f) { /* this block holds the last row, whose 32-bit loads may run past the buffer */
                pad = (uint8_t *)malloc((size_t)(in_f * eb / 8) + 8);
                if (pad == NULL) {
#pragma omp atomic write
                    rc = -2;
                    continue;
                }
            }
            for (int64_t m0 = 0; m0 < count[e]; m0 += 4) {
                int64_t mm = count[e] - m0 < 4 ? count[e] - m0 : 4, r = start[e] + m0;
                gemv_args a = {(const uint8_t *)(intptr_t)qptr[e], (const uint16_t *)(intptr_t)sptr[e],
                               (const uint16_t *)(intptr_t)zptr[e], xs + r * in_f, xsum + r * groups, y + r * out_f,
                               out_f, in_f, group_size, pad};
                gemv_range(eb, mm)(&a, begin, end);
            }
            free(pad);
        }
    }
    free(item_expert);
    free(xs);
    free(xsum);
    return rc;
}

/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * the whole-layer MoE decode (after moe_gemv.c). */

/* ---------------------------------------------------------------------------------------------------------------
 * A whole MoE layer for a few tokens (decode) in one call: sort the (token, slot) pairs by expert (counting sort;
 * dropped slots, index == E, are left out), gather their rows of x, grouped GEMV of gate_up, act(gate) * up,
 * grouped GEMV of down, then out[t] = sum of w[t, k] * y over the token's kept slots, in expert order.
 * act: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation), 3 relu (each act(gate) * up), 4 gpt-oss's clamped SwiGLU
 * (kernels/activations.py: gate clamped to <= 7, up to [-7, 7], (up + 1) * gate * sigmoid(1.702 * gate)).
 * ------------------------------------------------------------------------------------------------------------- */

static inline float activate(float v, int act) {
    switch (act) {
        case 0: return v / (1.0f + expf(-v));
        case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        case 2: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        default: return v > 0.0f ? v : 0.0f;
    }
}

static inline float gated(float g, float u, int act) {
    if (act != 4) return activate(g, act) * u;
    g = g < 7.0f ? g : 7.0f;
    u = u < -7.0f ? -7.0f : (u > 7.0f ? 7.0f : u);
    return (u + 1.0f) * (g / (1.0f + expf(-1.702f * g)));
}

/* Online dynamic pruning's routing rule (pruning/rule.py, evaluated in the same fp32 operations): a token drops a
 * slot other than its first top-weight slot when weight / max(top, 1e-20) < threshold (index -> E, weight 0); the
 * kept weights are rescaled to the original sum. idx2 / w2 receive the rewritten routing. */
static void odp_rule(const int64_t *idx, const float *w, int64_t T, int64_t K, int64_t E, float threshold,
                     int64_t *idx2, float *w2) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t *it = idx + t * K;
        const float *wt = w + t * K;
        int64_t top = 0;
        for (int64_t k = 1; k < K; k++)
            if (wt[k] > wt[top]) top = k;
        float denom = wt[top] > 1e-20f ? wt[top] : 1e-20f, total = 0.0f, kept = 0.0f;
        for (int64_t k = 0; k < K; k++) total += wt[k];
        for (int64_t k = 0; k < K; k++) {
            int drop = k != top && wt[k] / denom < threshold;
            idx2[t * K + k] = drop ? E : it[k];
            w2[t * K + k] = drop ? 0.0f : wt[k];
            kept += w2[t * K + k];
        }
        float scale = total / (kept > 1e-20f ? kept : 1e-20f);
        for (int64_t k = 0; k < K; k++) w2[t * K + k] = w2[t * K + k] * scale;
    }
}

/* Returns 0, -1 for an unsupported bit-width, -2 when out of memory, -3 for an index outside [0, E].
 * odp_threshold > 0 applies ODP's rule to the routing first; odp_counts (E + 3 int64, or NULL) accumulates ODP's
 * statistics: slots evaluated per expert [0, E), dropped slots [E], tokens [E + 2]. int8_act != 0 rounds the
 * GEMVs' inputs to int8 per group (the int8-activation GEMV above); 0 keeps them fp32. bits holds 2E widths: the
 * gate/up matrices' (bits[e]), then the down matrices' (bits[E + e]). gu_bias (E, 2I) / dn_bias (E, H) fp32, or
 * NULL: the experts' biases, added to each projection's output (gpt-oss). */
int mc_moe_decode(const float *x, int64_t T, int64_t K, const int64_t *idx_in, const float *w_in, const int64_t *gq,
                  const int64_t *gs, const int64_t *gz, const int64_t *dq, const int64_t *ds, const int64_t *dz,
                  const int32_t *bits, int64_t E, int64_t H, int64_t I, int64_t group_gu, int64_t group_dn, int act,
                  float *out, int threads, float odp_threshold, int64_t *odp_counts, int int8_act,
                  const float *gu_bias, const float *dn_bias) {
    memset(out, 0, sizeof(float) * (size_t)(T * H));
    int64_t *count = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    int64_t *start = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    int64_t *fill = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    int64_t *pair = (int64_t *)malloc(sizeof(int64_t) * (size_t)(T * K + 1));
    int64_t *idx_odp = (int64_t *)malloc(sizeof(int64_t) * (size_t)(T * K + 1));
    float *w_odp = (float *)malloc(sizeof(float) * (size_t)(T * K + 1));
    int rc = (count == NULL || start == NULL || fill == NULL || pair == NULL || idx_odp == NULL || w_odp == NULL) ? -2 : 0;
    float *xg = NULL, *h = NULL, *y = NULL;
    const int64_t *idx = idx_in;
    const float *w = w_in;
    int64_t P = 0;
    for (int64_t p = 0; rc == 0 && p < T * K; p++)
        if (idx[p] < 0 || idx[p] > E) rc = -3;
    if (rc == 0 && odp_threshold > 0.0f) {
        odp_rule(idx_in, w_in, T, K, E, odp_threshold, idx_odp, w_odp);
        idx = idx_odp;
        w = w_odp;
    }
    for (int64_t p = 0; rc == 0 && p < T * K; p++)
        if (idx[p] < E) count[idx[p]]++;
    if (rc == 0 && odp_counts != NULL) {
        for (int64_t p = 0; p < T * K; p++) odp_counts[idx[p]]++;
        odp_counts[E + 2] += T;
    }
    if (rc == 0) {
        for (int64_t e = 0; e < E; e++) {
            start[e] = P;
            P += count[e];
        }
        for (int64_t p = 0; p < T * K; p++)
            if (idx[p] < E) pair[start[idx[p]] + fill[idx[p]]++] = p;
        xg = (float *)malloc(sizeof(float) * (size_t)(P * H + 1));
        h = (float *)malloc(sizeof(float) * (size_t)(P * 2 * I + 1));
        y = (float *)malloc(sizeof(float) * (size_t)(P * H + 1));
        if (xg == NULL || h == NULL || y == NULL) rc = -2;
    }
    if (rc == 0 && P > 0) {
        for (int64_t r = 0; r < P; r++) memcpy(xg + r * H, x + (pair[r] / K) * H, sizeof(float) * (size_t)H);
        rc = mc_moe_gemv(xg, gq, gs, gz, bits, start, count, E, h, 2 * I, H, group_gu, threads, int8_act);
        if (rc == 0) {
            /* glu(gate + b, up + b), compacted in place into (P, I): rows in increasing order (sorted by expert) */
            for (int64_t e = 0; e < E; e++) {
                const float *gb = gu_bias != NULL ? gu_bias + e * 2 * I : NULL;
                for (int64_t r = start[e]; r < start[e] + count[e]; r++) {
                    float *hr = h + r * 2 * I, *ar = h + r * I;
                    if (gb == NULL)
                        for (int64_t j = 0; j < I; j++) ar[j] = gated(hr[j], hr[I + j], act);
                    else
                        for (int64_t j = 0; j < I; j++) ar[j] = gated(hr[j] + gb[j], hr[I + j] + gb[I + j], act);
                }
            }
            rc = mc_moe_gemv(h, dq, ds, dz, bits + E, start, count, E, y, H, I, group_dn, threads, int8_act);
        }
        if (rc == 0) {
            for (int64_t e = 0; e < E; e++) {
                const float *db = dn_bias != NULL ? dn_bias + e * H : NULL;
                for (int64_t r = start[e]; r < start[e] + count[e]; r++) {
                    float wr = w[pair[r]], *o = out + (pair[r] / K) * H;
                    const float *yr = y + r * H;
                    if (db == NULL)
                        for (int64_t j = 0; j < H; j++) o[j] += wr * yr[j];
                    else
                        for (int64_t j = 0; j < H; j++) o[j] += wr * (yr[j] + db[j]);
                }
            }
        }
    }
    free(count);
    free(start);
    free(fill);
    free(pair);
    free(idx_odp);
    free(w_odp);
    free(xg);
    free(h);
    free(y);
    return rc;
}

/* Part of the CPU kernels' one translation unit (mc_kernels.c includes it; not compiled on its own):
 * what the MoE prefill does with a projection's fp32 sums (after dequantize_bf16.c: uses floats_to_bf16()). */

/* ---------------------------------------------------------------------------------------------------------------
 * An epilogue (mc_epi) says where the sums of a prefill kernel go, so the MoE prefill needs no torch pass between
 * or after the projections:
 *   MC_EPI_STORE   y[m * ld + n] = sum (fp32; what mc_amx_linear always did);
 *   MC_EPI_GLU     the sums are one expert's gate/up projection (N = 2 * inter: gate columns [0, I), up [I, 2I)):
 *                  h[m * ld + j] = glu(gate_j + bias[j], up_j + bias[I + j]) (bias NULL: none), h fp32 or bf16
 *                  (out_bf16; rounded to nearest even like torch's cast). glu is the op's activation code (act, as
 *                  for mc_moe_decode); in AVX-512 with an exp of ~1 ulp (torch uses Sleef's, so the results
 *                  agree to a few fp32 ulp, not bit for bit; relu exactly); gelu's erfc is the C library's. The
 *                  gelus are written without the cancellation of 1 + erf / 1 + tanh for negative gates (torch has
 *                  it), so their tails (gate below about -4) are more accurate than torch's;
 *   MC_EPI_SCATTER the down projection: out[dst[m] * ld + n] += (sum + bias[n]) * weight[m] (bias NULL: none), the
 *                  same fp32 operations in the same order as adding the bias, multiplying by the routing weight and
 *                  index_add_ into the tokens' rows (so bit-identical to those torch ops, expert after expert).
 * Row m is the m-th row of x given to the kernel (the pairs of one expert, sorted). mc_moe_epilogue applies an
 * epilogue to an fp32 matrix of sums (the paths without a fused kernel); mc_amx_linear_epi applies it to each
 * block of tiles while it is in L1.
 * ------------------------------------------------------------------------------------------------------------- */
#define MC_EPI_STORE 0
#define MC_EPI_GLU 1
#define MC_EPI_SCATTER 2

/* mc_epi: declared in mc_kernels.h (the prefill kernels and ctypes read it too). */

/* glu(g, u) for one value: the formulas of glu512 below with the C library's expf / erfcf (builds without
 * AVX-512); NaN propagates as in torch (relu and the clamps keep it). */
static inline float glu1(float g, float u, int act) {
    switch (act) {
        case 0: return g / (1.0f + expf(-g)) * u;
        case 1: return 0.5f * g * erfcf(g * -0.70710678118654752f) * u;
        case 2: return g / (1.0f + expf(-1.5957691216057307f * (g + 0.044715f * g * (g * g)))) * u;
        case 3: return (g > 0.0f || g != g ? g : 0.0f) * u;
        default:
            g = g > 7.0f ? 7.0f : g;
            u = u > 7.0f ? 7.0f : (u < -7.0f ? -7.0f : u);
            return (u + 1.0f) * (g * (1.0f / (1.0f + expf(-(g * 1.702f)))));
    }
}

#ifdef __AVX512F__
/* e^x to ~1 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n). NaN stays NaN (min / max
 * return their second operand when one is NaN), large x gives inf, very negative x 0. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* glu(g, u) for 16 lanes; the formulas of kernels/activations.py (torch's silu is x / (1 + exp(-x)) too) */
static inline __m512 glu512(__m512 g, __m512 u, int act) {
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    switch (act) {
        case 0: return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(zero, g)))), u);
        case 1: { /* 0.5 g (1 + erf(g / sqrt 2)) = 0.5 g erfc(-g / sqrt 2): no cancellation for negative g */
            float t[16];
            _mm512_storeu_ps(t, g);
            for (int i = 0; i < 16; i++) t[i] = 0.5f * t[i] * erfcf(t[i] * -0.70710678118654752f);
            return _mm512_mul_ps(_mm512_loadu_ps(t), u);
        }
        case 2: { /* 0.5 g (1 + tanh(z)) = g / (1 + e^-2z): no cancellation where tanh(z) is near -1 */
            __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g), _mm512_mul_ps(g, g));
            __m512 z = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057307f), _mm512_add_ps(g, g3));
            return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, exp512(z))), u);
        }
        case 3: return _mm512_mul_ps(_mm512_max_ps(zero, g), u);
        default: { /* gpt-oss: (clamp(u, -7, 7) + 1) * g * sigmoid(1.702 g), g = min(g, 7) */
            const __m512 lim = _mm512_set1_ps(7.0f);
            g = _mm512_min_ps(lim, g);
            u = _mm512_max_ps(_mm512_set1_ps(-7.0f), _mm512_min_ps(lim, u));
            __m512 e = exp512(_mm512_sub_ps(zero, _mm512_mul_ps(g, _mm512_set1_ps(1.702f))));
            __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, e));
            return _mm512_mul_ps(_mm512_add_ps(u, one), _mm512_mul_ps(g, sig));
        }
    }
}
#endif

/* res[i] = glu(g[i] + bg[i * bs], u[i] + bu[i * bs]) for i < n; bg / bu NULL: no bias; bs 0 broadcasts one. */
static void glu_strip(const float *g, const float *u, const float *bg, const float *bu, int64_t bs, int64_t n,
                      int act, float *res) {
#ifdef __AVX512F__
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 vg = _mm512_maskz_loadu_ps(k, g + i), vu = _mm512_maskz_loadu_ps(k, u + i);
        if (bg != NULL) {
            vg = _mm512_add_ps(vg, bs ? _mm512_maskz_loadu_ps(k, bg + i) : _mm512_set1_ps(*bg));
            vu = _mm512_add_ps(vu, bs ? _mm512_maskz_loadu_ps(k, bu + i) : _mm512_set1_ps(*bu));
        }
        _mm512_mask_storeu_ps(res + i, k, glu512(vg, vu, act));
    }
#else
    for (int64_t i = 0; i < n; i++)
        res[i] = bg != NULL ? glu1(g[i] + bg[i * bs], u[i] + bu[i * bs], act) : glu1(g[i], u[i], act);
#endif
}

static inline void store_row(void *dst, const float *src, int64_t n, int bf16) {
    if (bf16)
        floats_to_bf16(src, (uint16_t *)dst, n);
    else
        memcpy(dst, src, sizeof(float) * (size_t)n);
}

/* STORE / SCATTER of a block of sums: acc[r * rs + m] is output column n0 + r of row m0 + m (r < nn, m < mm). */
static void epi_rows(const mc_epi *ep, const float *acc, int64_t rs, int64_t n0, int64_t nn, int64_t m0,
                     int64_t mm) {
    float *out = (float *)ep->out;
    for (int64_t m = 0; m < mm; m++) {
        if (ep->mode == MC_EPI_STORE) {
            float *o = out + (m0 + m) * ep->ld + n0;
            for (int64_t r = 0; r < nn; r++) o[r] = acc[r * rs + m];
        } else {
            float *o = out + ep->dst[m0 + m] * ep->ld + n0, w = ep->weight[m0 + m];
            if (ep->bias != NULL)
                for (int64_t r = 0; r < nn; r++) o[r] += (acc[r * rs + m] + ep->bias[n0 + r]) * w;
            else
                for (int64_t r = 0; r < nn; r++) o[r] += acc[r * rs + m] * w;
        }
    }
}

/* GLU of a block: gate[r * rs + m] / up[r * rs + m] are gate / up column j0 + r of row m0 + m (r < nj <= 16,
 * m < mm <= 32); res: a 16 x 32 scratch. */
static inline void epi_glu_block(const mc_epi *ep, const float *gate, const float *up, int64_t rs, int64_t j0,
                                 int64_t nj, int64_t m0, int64_t mm, float *res) {
    const float *b = ep->bias;
    for (int64_t r = 0; r < nj; r++)
        glu_strip(gate + r * rs, up + r * rs, b ? b + j0 + r : NULL, b ? b + ep->inter + j0 + r : NULL, 0, mm,
                  ep->act, res + r * 32);
    float row[16];
    for (int64_t m = 0; m < mm; m++) {
        for (int64_t r = 0; r < nj; r++) row[r] = res[r * 32 + m];
        char *h = (char *)ep->out + ((m0 + m) * ep->ld + j0) * (ep->out_bf16 ? 2 : 4);
        store_row(h, row, nj, ep->out_bf16);
    }
}

/* The epilogue applied to M rows of fp32 sums y (row stride ldy, N columns). Returns 0, -1 for a bad mode. */
int mc_moe_epilogue(const mc_epi *ep, const float *y, int64_t ldy, int64_t M, int64_t N, int threads) {
    if (ep->mode == MC_EPI_SCATTER) { /* one thread: rows of x may share a token row */
        for (int64_t m = 0; m < M; m++) epi_rows(ep, y + m * ldy, 1, 0, N, m, 1);
        return 0;
    }
    if (ep->mode != MC_EPI_GLU || N != 2 * ep->inter) return -1;
    const int64_t I = ep->inter, C = 256;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M * I >= (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        float res[256];
        const float *g = y + m * ldy, *b = ep->bias;
        char *h = (char *)ep->out + m * ep->ld * (ep->out_bf16 ? 2 : 4);
        for (int64_t j = 0; j < I; j += C) {
            int64_t n = I - j < C ? I - j : C;
            glu_strip(g + j, g + I + j, b ? b + j : NULL, b ? b + I + j : NULL, 1, n, ep->act, res);
            store_row(h + j * (ep->out_bf16 ? 2 : 4), res, n, ep->out_bf16);
        }
    }
    return 0;
}

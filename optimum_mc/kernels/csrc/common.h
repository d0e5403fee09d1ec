/* Shared by every part of the CPU kernels (csrc/mc_kernels.c): includes and small helpers. */
#ifndef MC_KERNELS_COMMON_H
#define MC_KERNELS_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

/* Exact fp16 -> fp32 conversion (per group, so its cost is small next to the codes). */
static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0) {
        float f = (float)man * 5.9604644775390625e-08f; /* man * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
#endif
}

static inline uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Row o of the packed matrix, or a padded copy of it if it is the last row (loads may run 3 bytes past it). */
static inline const uint8_t *row_ptr(const uint8_t *base, int64_t o, int64_t rows, int64_t row_bytes, uint8_t *pad) {
    const uint8_t *row = base + o * row_bytes;
    if (o != rows - 1) return row;
    memcpy(pad, row, (size_t)row_bytes);
    return pad;
}

#endif

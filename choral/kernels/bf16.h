/* bf16 <-> fp32 for the kernels: bf16 is the top half of an fp32, so widening is a shift;
 * narrowing rounds to nearest even like torch's .to(torch.bfloat16), and a NaN stays a (quiet) NaN. */
#ifndef CHORAL_BF16_H
#define CHORAL_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* The value an fp32 result has once a bf16 tensor op stores it. */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }
#endif

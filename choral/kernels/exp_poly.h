/* The core of the kernels' vector exponentials: e^r for x = n ln2 + r, |r| <= ln2 / 2, given x
 * and n (as a float), by the degree-6 Taylor polynomial of e^r (relative error ~1.2e-7). ln2 is
 * split in two parts (Cody-Waite) so r stays accurate for |n| up to ~128. The including kernel
 * defines f32v, its float vector type, first; each kernel scales by 2^n its own way. */
#ifndef CHORAL_EXP_POLY_H
#define CHORAL_EXP_POLY_H

static inline f32v exp_reduced(f32v x, f32v nf) {
    const f32v r = x - nf * 0.693145751953125f - nf * 1.42860682030941723e-06f;
    f32v p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p;
}
#endif

/* SwiGLU's activation: out[t][i] = silu(gate[t][i]) * up[t][i], for T rows of the fused gate/up
 * projection's output [T, 2I] (gate in columns 0..I-1, up in I..2I-1; row stride ld), fp32 or bf16.
 *
 * Why: torch runs it as two ops over [T, I] views (silu into a new tensor, then the product into
 * another), each reading and writing the whole activation: a 512-token step of SmolLM2 spends
 * ~0.75 ms a layer there on 2 cores. One pass here reads gate and up once and writes the result.
 * Same math as HF's `act_fn(gate) * up`: silu(x) = x / (1 + e^-x) in fp32; in bf16 the silu is
 * rounded to bf16 before the product, as torch's bf16 silu stores it, and the product is rounded
 * again.
 */
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define VL 16
#else
#define VL 8
#endif
typedef float f32v __attribute__((vector_size(VL * 4)));
typedef int32_t i32v __attribute__((vector_size(VL * 4)));

#include "exp_poly.h" /* after f32v: it is written in it */

static inline f32v select_v(i32v mask, f32v a, f32v b) {
    return (f32v)(((i32v)a & mask) | ((i32v)b & ~mask));
}

/* e^x lane-wise, as far as fp32 reaches: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6
 * Taylor polynomial (exp_poly.h; relative error ~1.2e-7), and n added to its exponent bits (not
 * multiplied by a built 2^n: for n = 128 that is inf, yet e^88.5 is finite). Past 88.72 the
 * result is inf, as e^x is (silu(x) of x < -88.72 is then -0, as torch's is); below -86.5, x is
 * clamped: e^x < 3e-38 only ever meets 1 + e^x here, where it vanishes anyway. */
static inline f32v exp_v(f32v x) {
    const f32v lo = x - x - 86.5f, hi = x - x + 88.72f, inf = x - x + __builtin_inff();
    const i32v over = x > hi;
    x = select_v(x > lo, x, lo);
    x = select_v(over, hi, x);
    /* round to nearest: add +-0.5 (the sign of x) and truncate toward zero */
    const f32v half = (f32v)(((i32v)x & (int32_t)0x80000000) | 0x3f000000);
    const i32v n = __builtin_convertvector(x * 1.44269504088896341f + half, i32v);
    const f32v nf = __builtin_convertvector(n, f32v);
    const f32v p = exp_reduced(x, nf);
    return select_v(over, inf, (f32v)((i32v)p + (n << 23)));
}

static inline f32v silu_v(f32v x) { return x / (1.0f + exp_v(-x)); }

/* Vectors of VL elements: loaded and stored whole, or (a row's last n < VL) through a
 * zero-padded copy. bf16 widens by a shift and narrows with rounding to nearest even (a NaN
 * stays a quiet NaN), as torch's conversions do. */
typedef uint32_t u32v __attribute__((vector_size(VL * 4)));
typedef uint16_t u16v __attribute__((vector_size(VL * 2)));

static inline f32v load_f32(const float *p) { f32v v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f32(float *p, f32v v) { memcpy(p, &v, sizeof v); }
static inline f32v load_bf16(const uint16_t *p) {
    u16v h;
    memcpy(&h, p, sizeof h);
    return (f32v)(__builtin_convertvector(h, u32v) << 16);
}
static inline u32v rounded_bits(f32v x) { /* the bf16 value's fp32 bits */
    const u32v u = (u32v)x;
    const i32v nan = (i32v)((u & 0x7fffffffu) > 0x7f800000u);
    const u32v even = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return (even & (u32v)~nan) | ((u | 0x400000u) & 0xffff0000u & (u32v)nan);
}
static inline f32v round_bf16_v(f32v x) { return (f32v)rounded_bits(x); }
static inline void store_bf16(uint16_t *p, f32v v) {
    const u16v h = __builtin_convertvector(rounded_bits(v) >> 16, u16v);
    memcpy(p, &h, sizeof h);
}
static inline f32v same_v(f32v x) { return x; }

#define DEFINE_SILU_MUL(NAME, T_ELEM, LOADV, ROUND, STOREV)                                       \
void NAME(const T_ELEM *gate_up, int ld, T_ELEM *out, int T, int I, int n_threads) {              \
    _Pragma("omp parallel for schedule(static) num_threads(n_threads) if ((long)T * I >= 32768)") \
    for (int t = 0; t < T; t++) {                                                                 \
        const T_ELEM *g = gate_up + (int64_t)t * ld, *u = g + I;                                  \
        T_ELEM *o = out + (int64_t)t * I;                                                         \
        int i = 0;                                                                                \
        for (; i + VL <= I; i += VL) STOREV(o + i, ROUND(silu_v(LOADV(g + i))) * LOADV(u + i));  \
        if (i < I) {                                                                              \
            T_ELEM gp[VL] = {0}, up[VL] = {0}, op[VL];                                            \
            memcpy(gp, g + i, sizeof(T_ELEM) * (I - i));                                          \
            memcpy(up, u + i, sizeof(T_ELEM) * (I - i));                                          \
            STOREV(op, ROUND(silu_v(LOADV(gp))) * LOADV(up));                                     \
            memcpy(o + i, op, sizeof(T_ELEM) * (I - i));                                          \
        }                                                                                         \
    }                                                                                             \
}

DEFINE_SILU_MUL(silu_mul_f32, float, load_f32, same_v, store_f32)
DEFINE_SILU_MUL(silu_mul_bf16, uint16_t, load_bf16, round_bf16_v, store_bf16)

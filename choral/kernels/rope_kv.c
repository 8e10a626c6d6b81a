/* Rotary embedding of q and k fused with the store of k and v into the paged KV cache, fp32 or
 * bf16.
 *
 * Why: in torch this is ~8 ops per layer (two slices, neg, cat, two muls, add, two index_puts),
 * each a pass over the step's q/k/v; a decode step of a 30-layer model runs 240 of them. Here it
 * is one pass that writes q (rotated, contiguous), and k (rotated) and v straight into their
 * cache slots.
 *
 * Rotate-half RoPE (HF's layout): with h = D / 2, for i < h
 *   out[i]     = x[i] * cos[i]     - x[i + h] * sin[i]
 *   out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h]
 * In bf16 each product and the sum are rounded to bf16, as the torch ops (x * cos +
 * rotate_half(x) * sin) round them, so both paths give the same bits.
 * Cache layouts (choral/models/attention.py): k_cache [NB, KVH, D, BS] (keys transposed inside a
 * block), v_cache [NB, BS, KVH, D].
 */
#include <stdint.h>

#include "bf16.h"

static inline float load_f32(float v) { return v; }
static inline float store_f32(float v) { return v; }
static inline float product_f32(float v) { return v; }

static inline float load_bf16(uint16_t v) { return bf16_to_f32(v); }
static inline uint16_t store_bf16(float v) { return f32_to_bf16(v); }

/* qk: [T, H + KVH, D] rows of stride ldqk (q heads then k heads); v: [T, KVH, D] rows of stride
 * ldv; cos, sin: [T, D]; blocks, offsets: [T] cache slot of each token; q_out: [T, H, D].
 * ROUND is what a product goes through before the sum (identity in fp32). */
#define DEFINE_ROPE_KV(NAME, T_, LOAD, STORE, ROUND)                                                 \
static inline void NAME##_rotate(const T_ *x, const T_ *cos, const T_ *sin, float *out, int D) {     \
    int h = D / 2;                                                                                   \
    for (int i = 0; i < h; i++) {                                                                    \
        float a = LOAD(x[i]), b = LOAD(x[i + h]);                                                    \
        out[i] = ROUND(a * LOAD(cos[i])) + ROUND(-b * LOAD(sin[i]));                                 \
        out[i + h] = ROUND(b * LOAD(cos[i + h])) + ROUND(a * LOAD(sin[i + h]));                      \
    }                                                                                                \
}                                                                                                    \
void NAME(const T_ *qk, int ldqk, const T_ *v, int ldv, const T_ *cos, const T_ *sin,                \
          const int64_t *blocks, const int64_t *offsets, T_ *q_out, T_ *k_cache, T_ *v_cache,        \
          int T, int H, int KVH, int D, int BS, int n_threads) {                                     \
    _Pragma("omp parallel for schedule(static) num_threads(n_threads) if (T >= 64)")                 \
    for (int t = 0; t < T; t++) {                                                                    \
        const T_ *row = qk + (int64_t)t * ldqk;                                                      \
        const T_ *c = cos + (int64_t)t * D, *s = sin + (int64_t)t * D;                               \
        float rotated[512]; /* head_dim <= 512 (checked by the caller) */                            \
        for (int hd = 0; hd < H; hd++) {                                                             \
            NAME##_rotate(row + hd * D, c, s, rotated, D);                                           \
            T_ *dst = q_out + ((int64_t)t * H + hd) * D;                                             \
            for (int d = 0; d < D; d++) dst[d] = STORE(rotated[d]);                                  \
        }                                                                                            \
        int64_t b = blocks[t], o = offsets[t];                                                       \
        for (int kh = 0; kh < KVH; kh++) {                                                           \
            NAME##_rotate(row + (H + kh) * D, c, s, rotated, D);                                     \
            T_ *kdst = k_cache + ((b * KVH + kh) * (int64_t)D) * BS + o; /* [b][kh][:][o] */         \
            for (int d = 0; d < D; d++) kdst[(int64_t)d * BS] = STORE(rotated[d]);                   \
            T_ *vdst = v_cache + ((b * BS + o) * KVH + kh) * (int64_t)D; /* [b][o][kh][:] */         \
            const T_ *vsrc = v + (int64_t)t * ldv + kh * D;                                          \
            for (int d = 0; d < D; d++) vdst[d] = vsrc[d];                                           \
        }                                                                                            \
    }                                                                                                \
}

DEFINE_ROPE_KV(rope_kv_f32, float, load_f32, store_f32, product_f32)
DEFINE_ROPE_KV(rope_kv_bf16, uint16_t, load_bf16, store_bf16, round_bf16)

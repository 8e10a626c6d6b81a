/* fp32 rotary embedding of q and k fused with the store of k and v into the paged KV cache.
 *
 * Why: in torch this is ~8 ops per layer (two slices, neg, cat, two muls, add, two index_puts),
 * each a pass over the step's q/k/v; a decode step of a 30-layer model runs 240 of them. Here it
 * is one pass that writes q (rotated, contiguous), and k (rotated) and v straight into their
 * cache slots.
 *
 * Rotate-half RoPE (HF's layout): with h = D / 2, for i < h
 *   out[i]     = x[i] * cos[i]     - x[i + h] * sin[i]
 *   out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h]
 * Cache layouts (choral/engine/attention.py): k_cache [NB, KVH, D, BS] (keys transposed inside a
 * block), v_cache [NB, BS, KVH, D].
 */
#include <stdint.h>

static inline void rotate(const float *x, const float *cos, const float *sin, float *out, int D) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        out[i] = x[i] * cos[i] - x[i + h] * sin[i];
        out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
    }
}

/* qk: [T, H + KVH, D] rows of stride ldqk (q heads then k heads); v: [T, KVH, D] rows of stride
 * ldv; cos, sin: [T, D]; blocks, offsets: [T] cache slot of each token; q_out: [T, H, D]. */
void rope_kv_f32(const float *qk, int ldqk, const float *v, int ldv, const float *cos, const float *sin,
                 const int64_t *blocks, const int64_t *offsets, float *q_out, float *k_cache, float *v_cache,
                 int T, int H, int KVH, int D, int BS, int n_threads) {
    _Pragma("omp parallel for schedule(static) num_threads(n_threads) if (T >= 64)")
    for (int t = 0; t < T; t++) {
        const float *row = qk + (int64_t)t * ldqk;
        const float *c = cos + (int64_t)t * D, *s = sin + (int64_t)t * D;
        for (int hd = 0; hd < H; hd++)
            rotate(row + hd * D, c, s, q_out + ((int64_t)t * H + hd) * D, D);
        int64_t b = blocks[t], o = offsets[t];
        for (int kh = 0; kh < KVH; kh++) {
            float k[512];  /* head_dim <= 512 (checked by the caller) */
            rotate(row + (H + kh) * D, c, s, k, D);
            float *kdst = k_cache + ((b * KVH + kh) * (int64_t)D) * BS + o;  /* [b][kh][:][o] */
            for (int d = 0; d < D; d++) kdst[(int64_t)d * BS] = k[d];
            float *vdst = v_cache + ((b * BS + o) * KVH + kh) * (int64_t)D;  /* [b][o][kh][:] */
            const float *vsrc = v + (int64_t)t * ldv + kh * D;
            for (int d = 0; d < D; d++) vdst[d] = vsrc[d];
        }
    }
}

/* Paged attention for CPU: every query token reads its sequence's keys and values through the
 * sequence's block table, with causal limits and an optional sliding window.
 *
 * Why a kernel: with torch ops, paged attention must first gather each sequence's K/V into a
 * contiguous copy (read + write the whole context per layer) before the matmuls read it again.
 * Here each K/V row is read once, straight from the pool, so a decode step costs about what its
 * bytes cost.
 *
 * Layouts (row-major):
 *   q            [T, H, D]              queries (already rope-rotated)
 *   k/v cache    [NB, BS, KVH, D]       the block pool for one layer
 *   block_tables [S, MAXB] int32        block ids of each sequence in the batch
 *   tok_seq      [T] int32              which sequence (row of block_tables) a token belongs to
 *   tok_limit    [T] int32              how many cached tokens it sees (its cache index + 1)
 *   out          [T, H, D]
 * Query head h reads KV head h / (H / KVH) (grouped-query attention).
 * Softmax is computed online in fp32, one block of keys at a time.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_D 256
#define CHUNK 32

static inline float bf16_to_f32(uint16_t b) {
    union { uint32_t u; float f; } x;
    x.u = ((uint32_t)b) << 16;
    return x.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } x;
    x.f = f;
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40); /* NaN */
    x.u += 0x7fffu + ((x.u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(x.u >> 16);
}

/* exp(x) for x <= 0 (scores minus their running max), branch-free so loops over it vectorize:
 * x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (relative error ~2e-7), 2^n
 * built in the exponent bits. Inputs below -87 (including -inf) flush to 0. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_roundf(x * 1.44269504088896341f);
    const float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return x <= -87.0f ? 0.0f : p * scale.f;
}

/* One (query token, kv head) pair: the G query heads that share this kv head walk the sequence's
 * keys CHUNK at a time: scores (dot products over d; built with -fassociative-math so the
 * reduction vectorizes), a chunk max, one rescale of the running sums, then P @ V.
 * K/V rows are converted to fp32 once per chunk (a plain copy for fp32 caches). */
#define DEFINE_KERNEL(NAME, T_ELEM, LOAD, STORE)                                                   \
void NAME(const T_ELEM *q, const T_ELEM *kc, const T_ELEM *vc, const int32_t *block_tables,     \
          int max_blocks, const int32_t *tok_seq, const int32_t *tok_limit, int n_tokens,          \
          int n_heads, int n_kv_heads, int head_dim, int block_size, int window, float scale,      \
          T_ELEM *out, int n_threads) {                                                            \
    const int group = n_heads / n_kv_heads;                                                        \
    const long kv_row = (long)n_kv_heads * head_dim;                                               \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(n_threads)")            \
    for (int t = 0; t < n_tokens; t++) {                                                           \
        for (int kh = 0; kh < n_kv_heads; kh++) {                                                  \
            float qf[MAX_GROUP][MAX_D] __attribute__((aligned(64)));                               \
            float acc[MAX_GROUP][MAX_D] __attribute__((aligned(64)));                              \
            float kf[CHUNK][MAX_D] __attribute__((aligned(64)));                                   \
            float vf[CHUNK][MAX_D] __attribute__((aligned(64)));                                   \
            float m[MAX_GROUP], l[MAX_GROUP];                                                      \
            float s[CHUNK];                                                                        \
            const int32_t *bt = block_tables + (long)tok_seq[t] * max_blocks;                      \
            const int limit = tok_limit[t];                                                        \
            int start = 0;                                                                         \
            if (window > 0 && limit > window) start = limit - window;                              \
            for (int g = 0; g < group; g++) {                                                      \
                const T_ELEM *qr = q + ((long)t * n_heads + kh * group + g) * head_dim;            \
                for (int d = 0; d < head_dim; d++) { qf[g][d] = LOAD(qr[d]) * scale; acc[g][d] = 0.f; } \
                m[g] = -INFINITY; l[g] = 0.f;                                                      \
            }                                                                                      \
            for (int j0 = start; j0 < limit; j0 += CHUNK) {                                        \
                const int n = (limit - j0) < CHUNK ? (limit - j0) : CHUNK;                         \
                for (int c = 0; c < n; c++) {                                                      \
                    const int j = j0 + c;                                                          \
                    const long slot = (long)bt[j / block_size] * block_size + j % block_size;      \
                    const T_ELEM *kr = kc + slot * kv_row + (long)kh * head_dim;                   \
                    const T_ELEM *vr = vc + slot * kv_row + (long)kh * head_dim;                   \
                    for (int d = 0; d < head_dim; d++) kf[c][d] = LOAD(kr[d]);                     \
                    for (int d = 0; d < head_dim; d++) vf[c][d] = LOAD(vr[d]);                     \
                }                                                                                  \
                for (int g = 0; g < group; g++) {                                                  \
                    const float *qg = qf[g];                                                       \
                    float cmax = m[g];                                                             \
                    for (int c = 0; c < n; c++) {                                                  \
                        const float *kr = kf[c];                                                   \
                        float dot = 0.f;                                                           \
                        for (int d = 0; d < head_dim; d++) dot += qg[d] * kr[d];                   \
                        s[c] = dot;                                                                \
                        cmax = dot > cmax ? dot : cmax;                                            \
                    }                                                                              \
                    const float corr = exp_nonpos(m[g] - cmax);                                    \
                    float sum = 0.f;                                                               \
                    for (int c = 0; c < n; c++) { s[c] = exp_nonpos(s[c] - cmax); sum += s[c]; }   \
                    l[g] = l[g] * corr + sum;                                                      \
                    m[g] = cmax;                                                                   \
                    float *ag = acc[g];                                                            \
                    for (int d = 0; d < head_dim; d++) ag[d] *= corr;                              \
                    for (int c = 0; c < n; c++) {                                                  \
                        const float p = s[c];                                                      \
                        const float *vr = vf[c];                                                   \
                        for (int d = 0; d < head_dim; d++) ag[d] += p * vr[d];                     \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            for (int g = 0; g < group; g++) {                                                      \
                T_ELEM *orow = out + ((long)t * n_heads + kh * group + g) * head_dim;              \
                const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;                                   \
                for (int d = 0; d < head_dim; d++) orow[d] = STORE(acc[g][d] * inv);               \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
#define STORE_BF16(x) f32_to_bf16(x)
#define LOAD_F16(x) ((float)(x))
#define STORE_F16(x) ((_Float16)(x))

DEFINE_KERNEL(paged_attention_f32, float, LOAD_F32, STORE_F32)
DEFINE_KERNEL(paged_attention_bf16, uint16_t, LOAD_BF16, STORE_BF16)
DEFINE_KERNEL(paged_attention_f16, _Float16, LOAD_F16, STORE_F16)

int choral_kernel_limits(int *max_group, int *max_head_dim) {
    *max_group = MAX_GROUP;
    *max_head_dim = MAX_D;
    return 1;
}

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
 *   k cache      [NB, KVH, D, BS]       the block pool for one layer; keys transposed per block
 *   v cache      [NB, BS, KVH, D]
 *   block_tables [S, MAXB] int32        block ids of each sequence in the batch
 *   tok_seq      [T] int32              which sequence (row of block_tables) a token belongs to
 *   tok_limit    [T] int32              how many cached tokens it sees (its cache index + 1)
 *   out          [T, H, D]
 * Query head h reads KV head h / (H / KVH) (grouped-query attention).
 * Softmax is computed online in fp32, one block of keys at a time. block_size <= MAX_BLOCK.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#define MAX_GROUP 16
#define MAX_D 256
#define MAX_BLOCK 256

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

/* Generic path (any block size / head_dim): one (query token, kv head) pair at a time, the G
 * query heads sharing the kv head walk the keys one block at a time with an online softmax. */
#define DEFINE_KERNEL(NAME, T_ELEM, LOAD, STORE)                                                   \
static void NAME(const T_ELEM *q, const T_ELEM *kc, const T_ELEM *vc, const int32_t *block_tables, \
          int max_blocks, const int32_t *tok_seq, const int32_t *tok_limit, int n_tokens,          \
          int n_heads, int n_kv_heads, int head_dim, int block_size, int window, float scale,      \
          T_ELEM *out, int n_threads) {                                                            \
    const int group = n_heads / n_kv_heads;                                                        \
    const long k_block = (long)n_kv_heads * head_dim * block_size;                                 \
    const long v_row = (long)n_kv_heads * head_dim;                                                \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(n_threads)")            \
    for (int t = 0; t < n_tokens; t++) {                                                           \
        for (int kh = 0; kh < n_kv_heads; kh++) {                                                  \
            float qf[MAX_GROUP][MAX_D];                                                            \
            float acc[MAX_GROUP][MAX_D];                                                           \
            float s[MAX_BLOCK];                                                                    \
            float m[MAX_GROUP], l[MAX_GROUP];                                                      \
            const int32_t *bt = block_tables + (long)tok_seq[t] * max_blocks;                      \
            const int limit = tok_limit[t];                                                        \
            int start = 0;                                                                         \
            if (window > 0 && limit > window) start = limit - window;                              \
            for (int g = 0; g < group; g++) {                                                      \
                const T_ELEM *qr = q + ((long)t * n_heads + kh * group + g) * head_dim;            \
                for (int d = 0; d < head_dim; d++) { qf[g][d] = LOAD(qr[d]) * scale; acc[g][d] = 0.f; } \
                m[g] = -INFINITY; l[g] = 0.f;                                                      \
            }                                                                                      \
            for (int b = start / block_size; b * block_size < limit; b++) {                        \
                const int c0 = b * block_size < start ? start - b * block_size : 0;                \
                const int c1 = (b + 1) * block_size > limit ? limit - b * block_size : block_size; \
                const T_ELEM *kb = kc + (long)bt[b] * k_block + (long)kh * head_dim * block_size;  \
                const T_ELEM *vb = vc + (long)bt[b] * block_size * v_row + (long)kh * head_dim;    \
                for (int g = 0; g < group; g++) {                                                  \
                    float cmax = m[g];                                                             \
                    for (int c = c0; c < c1; c++) {                                                \
                        float dot = 0.f;                                                           \
                        for (int d = 0; d < head_dim; d++)                                         \
                            dot += qf[g][d] * LOAD(kb[(long)d * block_size + c]);                  \
                        s[c] = dot;                                                                \
                        cmax = dot > cmax ? dot : cmax;                                            \
                    }                                                                              \
                    const float corr = exp_nonpos(m[g] - cmax);                                    \
                    float sum = 0.f;                                                               \
                    for (int c = c0; c < c1; c++) { s[c] = exp_nonpos(s[c] - cmax); sum += s[c]; } \
                    l[g] = l[g] * corr + sum;                                                      \
                    m[g] = cmax;                                                                   \
                    for (int d = 0; d < head_dim; d++) acc[g][d] *= corr;                          \
                    for (int c = c0; c < c1; c++) {                                                \
                        const T_ELEM *vr = vb + (long)c * v_row;                                   \
                        for (int d = 0; d < head_dim; d++) acc[g][d] += s[c] * LOAD(vr[d]);        \
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

/* ---- Fast path: block_size 16, head_dim a multiple of 64 (the common case) -------------------
 * GCC vector types make the accumulators registers. A call takes rows (token, query head): up
 * to HG_MAX = 4 query heads of one KV head for each of up to QT_MAX tokens of a prompt chunk, at
 * most ROWS_MAX rows, with 1-4 independent score chains over d each, and P @ V keeps PVW output
 * vectors per row in registers across the block's 16 keys. Register budget (VL = 16: 32
 * registers; VL = 8: 16): AVX-512 keeps up to 6 rows x 4 output vectors + 4 value vectors + 1
 * broadcast (29), 8 rows with 2 outputs; AVX2 takes 1 score chain and 2 output vectors from 3-4
 * rows on, and at most 6 rows: 6 x 2 + 2 + 1 = 15. Before, AVX2 went 2 heads at a time, so
 * SmolLM2's 3-head groups took two passes over each block's keys and values (b64 x 350 context
 * per layer, Zen 3, 2 threads: bf16 1.43 -> 1.10 ms,
 * fp32 ~5% less). Vectors have the ISA's native width, VL lanes
 * (16 with AVX-512, 8 otherwise): gcc lowers wider generic vectors through the stack, which on
 * an AVX2-only CPU (AMD Zen 3, 2 threads, SmolLM2's heads, per layer) cost decodes 2.7x (b64 x
 * 350 context: 6.2 -> 2.3 ms) and a 512-token prompt 5x (34 -> 7 ms; torch's flash attention:
 * 5-8 ms). A block's 16 scores take SV = 16 / VL vectors. */
#ifdef __AVX512F__
#define VL 16
#define ROWS_MAX 8 /* query rows per call (tokens x heads): 8 x 2 score chains, 8 x 2 outputs */
#else
#define VL 8
#define ROWS_MAX 6 /* 6 rows x 1 chain x 2 score vectors; 6 x 2 outputs + 2 values + 1 broadcast */
#endif
#define HG_MAX 4
#define QT_MAX 4   /* tokens per tile */
#define QT_STATE (2 * MAX_GROUP) /* a job's query rows of up to MAX_D floats: its arrays' size */
#define SV (16 / VL)
typedef float f32v __attribute__((vector_size(VL * 4)));
typedef int32_t i32v __attribute__((vector_size(VL * 4)));
typedef uint32_t u32v __attribute__((vector_size(VL * 4)));
typedef uint16_t u16v __attribute__((vector_size(VL * 2)));
typedef _Float16 f16v __attribute__((vector_size(VL * 2)));

#include "exp_poly.h" /* after f32v: it is written in it */

static inline f32v loadv_f32(const float *p) { f32v v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline f32v loadv_bf16(const uint16_t *p) {
#ifdef __AVX512F__
    /* One vpmovzxwd from memory; gcc splits the generic conversion into 256-bit pieces when it
     * prefers 256-bit vectors (znver4), tripling the instructions of the inner loops. */
    return (f32v)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#else
    u16v h; __builtin_memcpy(&h, p, sizeof h);
    return (f32v)(__builtin_convertvector(h, u32v) << 16);
#endif
}
static inline f32v loadv_f16(const _Float16 *p) {
    f16v h; __builtin_memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, f32v);
}

/* exp(x) for x <= 0 lane-wise; the same polynomial as exp_nonpos (exp_poly.h). */
static inline f32v expv_nonpos(f32v x) {
    const f32v lo = x - x - 87.0f;
    const i32v keep = x > lo;  /* -1 where x > -87 */
    x = (f32v)(((i32v)x & keep) | ((i32v)lo & ~keep));
    /* y <= 0, so truncating y - 0.5 toward zero rounds y to the nearest integer. */
    const i32v n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32v);
    const f32v nf = __builtin_convertvector(n, f32v);
    const f32v p = exp_reduced(x, nf);
    const f32v scale = (f32v)((n + 127) << 23);
    return (f32v)((i32v)(p * scale) & keep);
}

static inline f32v maxv(f32v a, f32v b) {
    const i32v gt = a > b;
    return (f32v)(((i32v)a & gt) | ((i32v)b & ~gt));
}

#ifdef __AVX512F__
static inline float hmaxv(f32v v) { return _mm512_reduce_max_ps((__m512)v); }
static inline float hsumv(f32v v) { return _mm512_reduce_add_ps((__m512)v); }
#elif defined(__AVX__)
/* Halving trees (3 steps); gcc turned the plain loops into a chain of 7 scalar ops each, and a
 * block takes two of these per query head. */
static inline float hmaxv(f32v v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
static inline float hsumv(f32v v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
#else
static inline float hmaxv(f32v v) { float m = v[0]; for (int i = 1; i < VL; i++) m = v[i] > m ? v[i] : m; return m; }
static inline float hsumv(f32v v) { float s = 0.f; for (int i = 0; i < VL; i++) s += v[i]; return s; }
#endif

/* A tile of query tokens against their keys, for a run of KV heads [kh0, kh1) at once: block by
 * block, every head of the run reads its slice of the block before the next block. A block holds
 * all KV heads side by side (K: KVH * D * BS contiguous elements, V: BS rows of KVH * D), so
 * reading the whole run per block walks contiguous memory the hardware prefetchers follow;
 * walking one head through all blocks first (the old order) touched every block KVH times, a
 * third of each V row at a time (b64 x 350 context, 30 layers of SmolLM2, 2 threads: fp32 83 ->
 * 62 ms, bf16 68 -> 57 ms). A decode token also prefetches the next block while this one
 * computes, since a sequence's blocks are scattered in the pool.
 *
 * A tile is up to QT consecutive tokens of one prompt chunk (a decode token is a tile of one).
 * Its tokens share the block walk: each key and value vector loaded serves QT x HG query rows,
 * and QK and P @ V run that many independent FMA chains (a 512-token prompt's layer, SmolLM2,
 * Zen 3, 2 threads, interleaved runs: fp32 4.3 -> 3.1 ms, bf16 5.7 -> 4.3 ms; the same code with
 * one token per tile ran as before). Rows are (token, head) pairs, at most ROWS_MAX per call;
 * each token masks the keys outside its own range [start, limit), so a tile's tokens may see
 * different windows. */
#define DEFINE_FAST(NAME, T_ELEM, LOAD, LOADV, STORE)                                              \
/* NT tokens x HG query heads sharing one KV head, against one block: each key and value vector  \
 * is loaded (and widened) once for all R = NT * HG rows, and the rows' FMA chains run side by    \
 * side. HG and NT are constants after inlining, so the score and output accumulators stay in   \
 * registers. The rows' queries come interleaved, qc[d * R + r] (row r = t * HG + g), so one     \
 * pointer serves every row's broadcast, and the d loop takes the rows one at a time: with a     \
 * pointer per row and every row's broadcast live at once, gcc ran out of AVX2's 16 registers   \
 * and kept two score accumulators on the stack, so QK waited on memory (~2.4x its FMA time on  \
 * a 512-token prompt, Zen 3). Row (t, g) keeps acc[t * acc_tok + g * nv] and                    \
 * m, l[t * ml_tok + g]; lane_ok[t * SV + u] is 0 on token t's keys of the block, -inf elsewhere. */ \
static inline __attribute__((always_inline)) void NAME##_rows(                                    \
        const float *qc, f32v *acc, int acc_tok, float *m, float *l, int ml_tok,                   \
        const T_ELEM *kb, const T_ELEM *vb, long v_row, int head_dim, int c_lo, int c_hi,          \
        const f32v *lane_ok, const char *pk, const char *pv, const int HG, const int NT) {         \
    const int BS = 16, nv = head_dim / VL, R = HG * NT;                                            \
    const int NCH = R == 1 ? 4 : (VL == 8 && R >= 4) ? 1 : 2; /* independent score chains per row */ \
    const int PVW = ((VL == 8 && R >= 3) || R > 6) ? 2 : 4; /* output vectors per row per walk */ \
    f32v s[ROWS_MAX][4][SV];                                                                       \
    for (int r = 0; r < R; r++)                                                                    \
        for (int i = 0; i < NCH; i++)                                                              \
            for (int u = 0; u < SV; u++) s[r][i][u] = (f32v){0};                                   \
    /* pv (or NULL): this head's value rows in the next block, 16 spans of row_bytes at a stride \
     * of v_row; pk (or NULL): its keys there, one span. Each step of d asks for an even share  \
     * of them (step bytes of each, a V share always within one row), so the fetch overlaps the \
     * compute; one burst of prefetches per block stalled the core until they landed and gained \
     * nothing. The caller passes pk only for key spans under 4 KB: the hardware prefetcher     \
     * follows a longer one by itself (fp32, head_dim 64: prefetching keys too was ~7% slower), \
     * but not a 2 KB bf16 one (~10% faster with). Decode b64 x 350 context per layer, Zen 3,   \
     * 2 threads, caches cold: fp32 2.4 -> 2.0 ms; streaming the same bytes: 1.2 ms. */         \
    const int step = NCH * BS * (int)sizeof(T_ELEM), row_bytes = head_dim * (int)sizeof(T_ELEM);   \
    const char *vp = pv;                                                                           \
    int in_row = 0;                                                                                \
    for (int d = 0; d < head_dim; d += NCH) {                                                      \
        if (NT == 1 && vp) { /* tiles are prompt chunks: only a lone token prefetches */          \
            for (int o = 0; o < step; o += 64) __builtin_prefetch(vp + in_row + o, 0, 2);          \
            in_row += step;                                                                        \
            if (in_row == row_bytes) { in_row = 0; vp += v_row * (long)sizeof(T_ELEM); }           \
        }                                                                                          \
        if (NT == 1 && pk)                                                                         \
            for (int o = 0; o < step; o += 64) __builtin_prefetch(pk + d / NCH * step + o, 0, 2);  \
        /* Row by row, each row's query value broadcast once for the SV key vectors: only one    \
         * broadcast is live at a time (R x SV accumulators + SV keys + 1 fit AVX2's 16). */      \
        for (int i = 0; i < NCH; i++) {                                                            \
            f32v k[SV];                                                                            \
            for (int u = 0; u < SV; u++) k[u] = LOADV(kb + (long)(d + i) * BS + u * VL);           \
            const float *qd = qc + (long)(d + i) * R;                                              \
            for (int r = 0; r < R; r++) {                                                          \
                const float qv = qd[r];                                                            \
                for (int u = 0; u < SV; u++) s[r][i][u] += qv * k[u];                              \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    f32v e[ROWS_MAX][SV];                                                                          \
    float corr[ROWS_MAX];                                                                          \
    for (int t = 0; t < NT; t++)                                                                   \
        for (int g = 0; g < HG; g++) {                                                             \
            const int r = t * HG + g;                                                              \
            float *mr = m + t * ml_tok + g, *lr = l + t * ml_tok + g;                              \
            f32v sc[SV];                                                                           \
            for (int u = 0; u < SV; u++) {                                                         \
                sc[u] = s[r][0][u] + lane_ok[t * SV + u];                                          \
                for (int i = 1; i < NCH; i++) sc[u] += s[r][i][u];                                 \
            }                                                                                      \
            f32v top = sc[0];                                                                      \
            for (int u = 1; u < SV; u++) top = maxv(top, sc[u]);                                   \
            const float bmax = hmaxv(top);                                                         \
            const float cmax = bmax > *mr ? bmax : *mr;                                            \
            /* -inf while a row has seen none of its keys (a tile's later token whose window     \
             * starts past this block): exp(-inf - 0) = 0 keeps its state at zero. */            \
            const float ref = cmax == -INFINITY ? 0.f : cmax;                                      \
            f32v sum = {0};                                                                        \
            for (int u = 0; u < SV; u++) { e[r][u] = expv_nonpos(sc[u] - ref); sum += e[r][u]; }  \
            corr[r] = exp_nonpos(*mr - ref);                                                       \
            *lr = *lr * corr[r] + hsumv(sum);                                                      \
            *mr = cmax;                                                                            \
        }                                                                                          \
    for (int j = 0; j < nv; j += PVW) {                                                            \
        f32v a[ROWS_MAX][4];                                                                       \
        for (int t = 0; t < NT; t++)                                                               \
            for (int g = 0; g < HG; g++)                                                           \
                for (int i = 0; i < PVW; i++)                                                      \
                    a[t * HG + g][i] = acc[t * acc_tok + g * nv + j + i] * corr[t * HG + g];       \
        const float *pe = (const float *)e; /* row r's 16 weights at pe + 16 r */                 \
        for (int c = c_lo; c < c_hi; c++) {                                                        \
            const T_ELEM *vr = vb + (long)c * v_row + j * VL;                                      \
            f32v v[4];                                                                             \
            for (int i = 0; i < PVW; i++) v[i] = LOADV(vr + i * VL);                               \
            for (int r = 0; r < R; r++) {                                                          \
                const float p = pe[r * 16 + c];                                                    \
                for (int i = 0; i < PVW; i++) a[r][i] += p * v[i];                                 \
            }                                                                                      \
        }                                                                                          \
        for (int t = 0; t < NT; t++)                                                               \
            for (int g = 0; g < HG; g++)                                                           \
                for (int i = 0; i < PVW; i++)                                                      \
                    acc[t * acc_tok + g * nv + j + i] = a[t * HG + g][i];                          \
    }                                                                                              \
}                                                                                                  \
static void NAME(const T_ELEM *q, const T_ELEM *kc, const T_ELEM *vc, const int32_t *block_tables, \
                 int max_blocks, const int32_t *tok_seq, const int32_t *tok_limit, int n_tokens,   \
                 int n_heads, int n_kv_heads, int head_dim, int window, float scale,               \
                 T_ELEM *out, int n_threads) {                                                     \
    const int BS = 16;                                                                             \
    const int group = n_heads / n_kv_heads;                                                        \
    const int nv = head_dim / VL; /* vectors per head row */                                       \
    const long k_block = (long)n_kv_heads * head_dim * BS;                                         \
    const long v_row = (long)n_kv_heads * head_dim;                                                \
    /* Tokens per tile: as many as keep a call's rows (tokens x heads of one call) in registers. */\
    const int hg_first = group < HG_MAX ? group : HG_MAX;                                          \
    const int qt = ROWS_MAX / hg_first < QT_MAX ? ROWS_MAX / hg_first : QT_MAX;                    \
    /* KV heads per job: as many as the tile's query state fits the arrays (QT_STATE rows of D). */\
    int run = QT_STATE * MAX_D / (qt * group * head_dim);                                          \
    if (run > n_kv_heads) run = n_kv_heads;                                                        \
    const int n_runs = (n_kv_heads + run - 1) / run;                                               \
    /* tiles[i] = first token of tile i; tiles[n_tiles] = n_tokens. Without memory, a tile per    \
     * token (tile_of(i) = i). */                                                                  \
    int *tiles = (int *)malloc(sizeof(int) * ((size_t)n_tokens + 1));                              \
    int n_tiles = 0;                                                                               \
    if (tiles) {                                                                                   \
        for (int t = 0; t < n_tokens;) {                                                           \
            int nt = 1;                                                                            \
            while (nt < qt && t + nt < n_tokens && tok_seq[t + nt] == tok_seq[t]) nt++;            \
            tiles[n_tiles++] = t;                                                                  \
            t += nt;                                                                               \
        }                                                                                          \
        tiles[n_tiles] = n_tokens;                                                                 \
    } else {                                                                                       \
        n_tiles = n_tokens;                                                                        \
    }                                                                                              \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(n_threads)")                        \
    for (int job = 0; job < n_tiles * n_runs; job++) {                                             \
        const int ti = job / n_runs, kh0 = (job % n_runs) * run;                                   \
        const int t0 = tiles ? tiles[ti] : ti, nt = (tiles ? tiles[ti + 1] : ti + 1) - t0;         \
        const int kh1 = kh0 + run < n_kv_heads ? kh0 + run : n_kv_heads;                           \
        const int nh = (kh1 - kh0) * group; /* query heads of this run */                          \
        /* Scaled queries, one chunk per call (KV head kh, heads g0 .. g0 + hg - 1): the chunk of \
         * heads h0 = (kh - kh0) * group + g0 starts at h0 * nt * head_dim and holds [d][nt][hg]. */ \
        float qf[QT_STATE * MAX_D] __attribute__((aligned(64)));                                  \
        f32v acc[QT_STATE * MAX_D / VL];                         /* [nt][nh][nv] */                \
        float m[QT_STATE * MAX_D / 64], l[QT_STATE * MAX_D / 64]; /* [nt][nh] */                   \
        int lo[QT_MAX], hi[QT_MAX]; /* each token's keys: [lo, hi) */                              \
        const int32_t *bt = block_tables + (long)tok_seq[t0] * max_blocks;                         \
        int first = tok_limit[t0], last = 0;                                                       \
        for (int i = 0; i < nt; i++) {                                                             \
            const int limit = tok_limit[t0 + i];                                                   \
            lo[i] = window > 0 && limit > window ? limit - window : 0;                             \
            hi[i] = limit;                                                                         \
            if (lo[i] < first) first = lo[i];                                                      \
            if (hi[i] > last) last = hi[i];                                                        \
            for (int h = 0; h < nh; h++) {                                                         \
                const T_ELEM *qr = q + ((long)(t0 + i) * n_heads + kh0 * group + h) * head_dim;    \
                const int g = h % group, g0 = g - g % HG_MAX;                                      \
                const int hg = group - g0 < HG_MAX ? group - g0 : HG_MAX;                          \
                float *qd = qf + (long)(h - g + g0) * nt * head_dim + i * hg + (g - g0);           \
                for (int d = 0; d < head_dim; d++) qd[(long)d * nt * hg] = LOAD(qr[d]) * scale;    \
                for (int j = 0; j < nv; j++) acc[(i * nh + h) * nv + j] = (f32v){0};               \
                m[i * nh + h] = -INFINITY; l[i * nh + h] = 0.f;                                    \
            }                                                                                      \
        }                                                                                          \
        /* A decode token (alone in its sequence) streams its context from memory once: prefetch  \
         * the next block while this one computes. A prompt chunk's tokens share their blocks,    \
         * which stay in cache, so prefetching them only costs instructions. */                    \
        const int lone = nt == 1 && (t0 == 0 || tok_seq[t0 - 1] != tok_seq[t0]) &&                 \
                         (t0 + 1 == n_tokens || tok_seq[t0 + 1] != tok_seq[t0]);                   \
        const int head_elems = head_dim * BS;      /* one head's keys in a block */                \
        for (int b = first / BS; b * BS < last; b++) {                                             \
            f32v lane_ok[QT_MAX * SV]; /* [nt][SV]: 0 on a token's keys in this block, else -inf */\
            int c_lo = BS, c_hi = 0;   /* keys any token of the tile sees here */                  \
            for (int i = 0; i < nt; i++) {                                                         \
                int c0 = lo[i] - b * BS, c1 = hi[i] - b * BS;                                      \
                c0 = c0 < 0 ? 0 : c0 > BS ? BS : c0;                                               \
                c1 = c1 < 0 ? 0 : c1 > BS ? BS : c1;                                               \
                if (c0 < c1) { c_lo = c0 < c_lo ? c0 : c_lo; c_hi = c1 > c_hi ? c1 : c_hi; }       \
                for (int u = 0; u < SV; u++) lane_ok[i * SV + u] = (f32v){0};                      \
                if (c0 > 0 || c1 < BS)                                                             \
                    for (int c = 0; c < BS; c++)                                                   \
                        lane_ok[i * SV + c / VL][c % VL] = (c >= c0 && c < c1) ? 0.f : -INFINITY;  \
            }                                                                                      \
            const T_ELEM *kblk = kc + (long)bt[b] * k_block;                                       \
            const T_ELEM *vblk = vc + (long)bt[b] * BS * v_row;                                    \
            const int has_next = lone && (b + 1) * BS < last;                                      \
            const T_ELEM *kn = has_next && head_elems * (int)sizeof(T_ELEM) < 4096                 \
                ? kc + (long)bt[b + 1] * k_block : NULL;                                           \
            const T_ELEM *vn = has_next ? vc + (long)bt[b + 1] * BS * v_row : NULL;                \
            for (int kh = kh0; kh < kh1; kh++) {                                                   \
                const T_ELEM *kb = kblk + (long)kh * head_elems;                                   \
                const T_ELEM *vb = vblk + (long)kh * head_dim;                                     \
                const char *pk0 = kn ? (const char *)(kn + (long)kh * head_elems) : NULL;          \
                const char *pv0 = vn ? (const char *)(vn + (long)kh * head_dim) : NULL;            \
                for (int g0 = 0; g0 < group; g0 += HG_MAX) {                                       \
                    const int h = (kh - kh0) * group + g0;                                         \
                    const int hg = group - g0 < HG_MAX ? group - g0 : HG_MAX;                      \
                    const float *qh = qf + (long)h * nt * head_dim;                                \
                    const char *pk = g0 == 0 ? pk0 : NULL, *pv = g0 == 0 ? pv0 : NULL;             \
                    f32v *ah = acc + h * nv;                                                       \
                    switch (hg * 8 + nt) {                                                         \
                    ROWS_CASE(NAME, 1, 1) ROWS_CASE(NAME, 1, 2) ROWS_CASE(NAME, 1, 3) ROWS_CASE(NAME, 1, 4) \
                    ROWS_CASE(NAME, 2, 1) ROWS_CASE(NAME, 2, 2) ROWS_CASE(NAME, 2, 3) ROWS_CASE(NAME, 2, 4) \
                    ROWS_CASE(NAME, 3, 1) ROWS_CASE(NAME, 3, 2)                                    \
                    ROWS_CASE(NAME, 4, 1) ROWS_CASE(NAME, 4, 2)                                    \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < nt; i++)                                                               \
            for (int h = 0; h < nh; h++) {                                                         \
                T_ELEM *orow = out + ((long)(t0 + i) * n_heads + kh0 * group + h) * head_dim;      \
                const float inv = l[i * nh + h] > 0.f ? 1.f / l[i * nh + h] : 0.f;                 \
                for (int j = 0; j < nv; j++)                                                       \
                    for (int c = 0; c < VL; c++)                                                   \
                        orow[j * VL + c] = STORE(acc[(i * nh + h) * nv + j][c] * inv);             \
            }                                                                                      \
    }                                                                                              \
    free(tiles);                                                                                   \
}

/* One call of NAME##_rows for HG heads x NT tokens: only combinations whose rows fit ROWS_MAX
 * (the tile size guarantees no other occurs). */
#define ROWS_CASE(NAME, HGc, NTc)                                                                  \
    case HGc * 8 + NTc:                                                                            \
        if (HGc * NTc <= ROWS_MAX)                                                                 \
            NAME##_rows(qh, ah, nh * nv, m + h, l + h, nh, kb, vb, v_row, head_dim,                \
                        c_lo, c_hi, lane_ok, pk, pv, HGc, HGc * NTc <= ROWS_MAX ? NTc : 1);        \
        break;

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
#define STORE_BF16(x) f32_to_bf16(x)
#define LOAD_F16(x) ((float)(x))
#define STORE_F16(x) ((_Float16)(x))

DEFINE_KERNEL(generic_f32, float, LOAD_F32, STORE_F32)
DEFINE_KERNEL(generic_bf16, uint16_t, LOAD_BF16, STORE_BF16)
DEFINE_KERNEL(generic_f16, _Float16, LOAD_F16, STORE_F16)
DEFINE_FAST(fast_f32, float, LOAD_F32, loadv_f32, STORE_F32)
DEFINE_FAST(fast_bf16, uint16_t, LOAD_BF16, loadv_bf16, STORE_BF16)
DEFINE_FAST(fast_f16, _Float16, LOAD_F16, loadv_f16, STORE_F16)

#define DEFINE_DISPATCH(NAME, T_ELEM, SUFFIX)                                                      \
void NAME(const T_ELEM *q, const T_ELEM *kc, const T_ELEM *vc, const int32_t *block_tables,     \
          int max_blocks, const int32_t *tok_seq, const int32_t *tok_limit, int n_tokens,          \
          int n_heads, int n_kv_heads, int head_dim, int block_size, int window, float scale,      \
          T_ELEM *out, int n_threads) {                                                            \
    if (block_size == 16 && head_dim % 64 == 0)                                                    \
        fast_##SUFFIX(q, kc, vc, block_tables, max_blocks, tok_seq, tok_limit, n_tokens, n_heads,  \
                      n_kv_heads, head_dim, window, scale, out, n_threads);                        \
    else                                                                                           \
        generic_##SUFFIX(q, kc, vc, block_tables, max_blocks, tok_seq, tok_limit, n_tokens,        \
                         n_heads, n_kv_heads, head_dim, block_size, window, scale, out, n_threads);\
}

DEFINE_DISPATCH(paged_attention_f32, float, f32)
DEFINE_DISPATCH(paged_attention_bf16, uint16_t, bf16)
DEFINE_DISPATCH(paged_attention_f16, _Float16, f16)

int choral_kernel_limits(int *max_group, int *max_head_dim, int *max_block) {
    *max_group = MAX_GROUP;
    *max_head_dim = MAX_D;
    *max_block = MAX_BLOCK;
    return 1;
}

/* y[M, N] = x[M, K] @ W[K, N] (+ bias[N]) with W packed once into 32-column panels, fp32 or bf16.
 *
 * Why: at the batch sizes of decode steps (M = 1..64) MKL re-packs the whole weight on every
 * call, so each step moves the weights through memory more than once. Packing once at load time
 * leaves one pass (SmolLM2's projections at M = 32 with cold weights: 64 -> 44 ms per step).
 *
 * Layout (fp32): packed[p][k][c] = W[k][32 p + c] for panel p = 0 .. ceil(N / 32) - 1, zero past N.
 * Layout (bf16): packed[p][k][i] for i < 16 is one 32-bit word holding W[k][32 p + i] in its low
 * half and W[k][32 p + 16 + i] in its high half. A shift and a mask turn the word vector into the
 * panel row's two fp32 vectors (bf16 is the top half of an fp32), so the bf16 kernel runs on fp32
 * FMAs with x given in fp32. Where vdpbf16ps runs at half the FMA units' throughput (an Intel
 * AVX-512 VM without AMX: 157 vs 339 GFLOP/s on 2 cores) this is ~2x oneDNN, and the weights
 * still move at half the bytes; where bf16 dot products are full rate (AMX, AMD Zen 4: oneDNN
 * 420 vs 200 GFLOP/s here) oneDNN wins. choral/models/linear.py times both and picks.
 * Products of bf16 values are exact in fp32 and sums accumulate in fp32, as oneDNN's do; the
 * bf16 output is rounded to nearest even.
 * Threads take panels (small_gemm_f32 says how they are handed out); within a panel, rows go in
 * blocks of up to MR, whose accumulators stay in registers while k runs over K: 2 vectors of VL
 * lanes per row, so a panel takes NV / 2 passes over K (one with AVX-512's 16 lanes, two with
 * AVX2's 8). The panel (K * 128 B) comes from cache: while a panel computes, its row blocks
 * prefetch the next panel into L2 at an even rate.
 *
 * Vector width follows the ISA the kernel is compiled for (-march=native): 16 lanes with
 * AVX-512, 8 otherwise. gcc lowers 64-byte generic vectors on a 256-bit-only CPU (AVX2) through
 * the stack, which ran this kernel at 4 GFLOP/s on an AMD Zen 3 VM (2 threads; torch fp32
 * 110-160). At the native width: ~175 fp32 and bf16 at M >= 64. Two passes of 16 columns with
 * 6-row blocks halve the L2 reads per FMA against one 32-column pass with 3-row blocks (that
 * one ran at ~86).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define PANEL 32
#ifdef __AVX512F__
#define VL 16
#define MR 12 /* 2 * MR accumulators + 2 weight vectors + 1 broadcast fit AVX-512's 32 registers */
#else
#define VL 8
#define MR 6 /* 2 * MR accumulators + 2 weight vectors + 1 broadcast fit AVX2's 16 registers */
#endif
#define NV (PANEL / VL)  /* fp32 vectors per panel row: 2 or 4 */
#define PASSES (NV / 2)  /* passes over K per panel, 2 vectors (2 * VL columns) each */

typedef float f32v __attribute__((vector_size(VL * 4)));
typedef uint32_t u32v __attribute__((vector_size(VL * 4)));

static inline f32v loadv(const float *p) { f32v v; memcpy(&v, p, sizeof v); return v; }
static inline void storev(float *p, f32v v) { memcpy(p, &v, sizeof v); }

void small_gemm_pack_f32(const float *w, float *packed, int K, int N) {
    int panels = (N + PANEL - 1) / PANEL;
    for (int p = 0; p < panels; p++) {
        for (int k = 0; k < K; k++) {
            float *dst = packed + ((int64_t)p * K + k) * PANEL;
            for (int c = 0; c < PANEL; c++) {
                int n = p * PANEL + c;
                dst[c] = n < N ? w[(int64_t)k * N + n] : 0.0f;
            }
        }
    }
}

/* w [K, N] bf16 -> packed [panels][K][16 words]: word i = column i (low half), 16 + i (high). */
void small_gemm_pack_bf16(const uint16_t *w, uint16_t *packed, int K, int N) {
    int panels = (N + PANEL - 1) / PANEL;
    for (int p = 0; p < panels; p++) {
        for (int k = 0; k < K; k++) {
            uint16_t *dst = packed + ((int64_t)p * K + k) * PANEL;
            for (int c = 0; c < PANEL; c++) {
                int n = p * PANEL + c;
                dst[2 * (c % 16) + c / 16] = n < N ? w[(int64_t)k * N + n] : 0;
            }
        }
    }
}

/* Pass h's two vectors of panel row k: w[i] = columns (2 h + i) * VL .. + VL - 1. bf16: word
 * vector j holds columns j * VL + lane in its low halves and 16 + j * VL + lane in its high
 * halves, so vector v of the row is word vector v % (NV / 2), shifted (v < NV / 2) or masked. */
#define LOAD_W_F32(panel, k, h, w)                                                                \
    for (int i = 0; i < 2; i++) w[i] = loadv(panel + (int64_t)(k) * PANEL + (2 * (h) + i) * VL);
#define LOAD_W_BF16(panel, k, h, w)                                                               \
    for (int i = 0; i < 2; i++) {                                                                 \
        const int v = 2 * (h) + i;                                                                \
        u32v words;                                                                               \
        memcpy(&words, panel + (int64_t)(k) * PANEL + 2 * (v % (NV / 2)) * VL, sizeof words);     \
        w[i] = v < NV / 2 ? (f32v)(words << 16) : (f32v)(words & 0xffff0000u);                   \
    }

/* fp32 -> bf16, round to nearest even; NaN stays NaN (quiet). */
static inline void to_bf16(uint16_t *out, f32v a) {
    u32v u = (u32v)a;
    const u32v nan = (u & 0x7fffffffu) > 0x7f800000u;
    u32v rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    rounded = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    for (int i = 0; i < VL; i++) out[i] = (uint16_t)rounded[i];
}

/* Columns [c, c + 2 VL) of a row (``out`` points at column c), of which ``ncols`` exist. */
static inline void store_f32(float *out, const f32v *a, int ncols) {
    if (ncols >= 2 * VL) {
        storev(out, a[0]);
        storev(out + VL, a[1]);
    } else if (ncols > 0) {
        float tmp[2 * VL];
        storev(tmp, a[0]);
        storev(tmp + VL, a[1]);
        memcpy(out, tmp, sizeof(float) * ncols);
    }
}

static inline void store_bf16(uint16_t *out, const f32v *a, int ncols) {
    if (ncols <= 0) return;
    uint16_t tmp[2 * VL];
    to_bf16(tmp, a[0]);
    to_bf16(tmp + VL, a[1]);
    memcpy(out, tmp, sizeof(uint16_t) * (ncols < 2 * VL ? ncols : 2 * VL));
}

/* Rows r0 .. r0 + mr - 1 of y, columns col0 .. col0 + ncols - 1 (one panel), pass by pass.
 * ``mr`` is a constant after inlining, so the accumulator arrays live in registers. */
#define DEFINE_BLOCK(NAME, WT, YT, LOAD_W, STORE)                                                 \
static inline __attribute__((always_inline)) void NAME(                                           \
        const float *x, const WT *panel, const float *bias32, YT *y, int K, int N, int ldx,      \
        int r0, int mr, int col0, int ncols, const WT *prefetch, int pf_row, int pf_every) {     \
    const float *xr = x + (int64_t)r0 * ldx;                                                      \
    int countdown = 0;                                                                            \
    for (int h = 0; h < PASSES; h++) {                                                            \
        f32v acc[MR][2];                                                                          \
        for (int r = 0; r < mr; r++)                                                              \
            for (int i = 0; i < 2; i++) acc[r][i] = loadv(bias32 + (2 * h + i) * VL);             \
        for (int k = 0; k < K; k++) {                                                             \
            f32v w[2];                                                                            \
            LOAD_W(panel, k, h, w)                                                                \
            if (prefetch && --countdown < 0) { /* one row of the next panel into L2 */            \
                const char *row = (const char *)(prefetch + (int64_t)pf_row * PANEL);             \
                for (int off = 0; off < PANEL * (int)sizeof(WT); off += 64)                       \
                    __builtin_prefetch(row + off, 0, 2);                                          \
                pf_row++;                                                                         \
                countdown = pf_every - 1;                                                         \
            }                                                                                     \
            for (int r = 0; r < mr; r++) {                                                        \
                float s = xr[(int64_t)r * ldx + k];                                               \
                acc[r][0] += s * w[0];                                                            \
                acc[r][1] += s * w[1];                                                            \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < mr; r++)                                                              \
            STORE(y + (int64_t)(r0 + r) * N + col0 + 2 * h * VL, acc[r], ncols - 2 * h * VL);     \
    }                                                                                             \
}

/* x [M, K] fp32 (row stride ldx) times the packed weight -> y [M, N], one panel per call.
 * CASE is a row block of n rows (n <= MR: larger n never occur). */
#define CASE(BLOCK, n)                                                                            \
    case n: if (n <= MR) BLOCK(x, panel, bias32, y, K, N, ldx, r0, n, col0, ncols, pf, pf_row, blocks * PASSES); break;
#define DEFINE_GEMM(NAME, WT, YT, BLOCK, BIAS_TO_F32)                                             \
static inline __attribute__((always_inline)) void NAME##_panel(                                   \
        const float *x, const WT *packed, const WT *bias, YT *y, int M, int K, int N, int ldx,   \
        int p, int panels) {                                                                      \
    const WT *panel = packed + (int64_t)p * K * PANEL;                                            \
    int col0 = p * PANEL;                                                                         \
    int ncols = N - col0 < PANEL ? N - col0 : PANEL;                                              \
    float bias32[PANEL] = {0};                                                                    \
    if (bias)                                                                                     \
        for (int c = 0; c < ncols; c++) bias32[c] = BIAS_TO_F32(bias[col0 + c]);                  \
    /* The next panel streams into L2 while this one computes: row block j of ``blocks``          \
     * prefetches its j-th share of the next panel's rows, one row every ``blocks`` steps of      \
     * k, so DRAM is read at an even rate over the whole panel's compute. */                      \
    const int blocks = (M + MR - 1) / MR;                                                         \
    const WT *pf = p + 1 < panels ? panel + (int64_t)K * PANEL : 0;                               \
    for (int r0 = 0; r0 < M; r0 += MR) {                                                          \
        int mr = M - r0 < MR ? M - r0 : MR;                                                       \
        int pf_row = (int)((int64_t)(r0 / MR) * K / blocks);                                      \
        switch (mr) {                                                                             \
            CASE(BLOCK, 1) CASE(BLOCK, 2) CASE(BLOCK, 3) CASE(BLOCK, 4) CASE(BLOCK, 5)            \
            CASE(BLOCK, 6) CASE(BLOCK, 7) CASE(BLOCK, 8) CASE(BLOCK, 9) CASE(BLOCK, 10)           \
            CASE(BLOCK, 11) CASE(BLOCK, 12)                                                       \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
/* Small M (decode steps) streams the weights: each thread takes a contiguous run of panels, so \
 * its next-panel prefetches are the panels it computes next (M = 32, 30 layers of SmolLM2's    \
 * projections, Zen 3, 2 threads: 48 ms; handing out panels one by one: 60). Large M computes   \
 * for long per panel: panels go one at a time to whichever thread is free, so a thread that    \
 * loses its core for a while (a busy VM) does not hold the other at the barrier (M = 512, three \
 * runs: static 720-1030 ms, one at a time 660-830). In between (M = 64-127), runs of an eighth \
 * of a thread's share go to whichever thread is free: mostly contiguous, and a slow thread     \
 * costs at most a run (a 64-sequence decode step, SmolLM2, Zen 3, two interleaved pairs:       \
 * medians 215 and 179 ms against 260 and 245 with fixed halves; at 32 and 48 sequences fixed   \
 * halves stayed as fast or faster, so they keep them). */                                      \
void NAME(const float *x, const WT *packed, const WT *bias, YT *y, int M, int K, int N, int ldx, \
          int n_threads) {                                                                        \
    const int panels = (N + PANEL - 1) / PANEL;                                                   \
    /* Panels per hand-out: 1 from 128 rows, an eighth of a thread's share from 64, else a thread's \
     * whole share (one contiguous run each). */                                                  \
    const int share = (panels + n_threads - 1) / n_threads;                                      \
    const int run = M >= 128 ? 1 : M >= 64 ? (share / 8 > 0 ? share / 8 : 1) : share;           \
    _Pragma("omp parallel for schedule(dynamic, run) num_threads(n_threads)")                     \
    for (int p = 0; p < panels; p++) NAME##_panel(x, packed, bias, y, M, K, N, ldx, p, panels);   \
}

static inline float f32_to_f32(float v) { return v; }

DEFINE_BLOCK(block_f32, float, float, LOAD_W_F32, store_f32)
DEFINE_GEMM(small_gemm_f32, float, float, block_f32, f32_to_f32)
DEFINE_BLOCK(block_bf16, uint16_t, uint16_t, LOAD_W_BF16, store_bf16)
DEFINE_GEMM(small_gemm_bf16, uint16_t, uint16_t, block_bf16, bf16_to_f32)

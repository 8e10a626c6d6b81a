/* fp32 y[M, N] = x[M, K] @ W[K, N] (+ bias[N]) with W packed once into 32-column panels.
 *
 * Why: at the batch sizes of decode steps (M = 1..64) MKL re-packs the whole weight on every
 * call, so each step moves the weights through memory more than once. Packing once at load time
 * leaves one pass (SmolLM2's projections at M = 32 with cold weights: 64 -> 44 ms per step).
 *
 * Layout: packed[p][k][c] = W[k][32 p + c] for panel p = 0 .. ceil(N / 32) - 1, zero past N.
 * Each thread takes a contiguous run of panels (static schedule); within a panel, rows go in
 * blocks of up to MR, whose 2 * MR accumulators (16 lanes each) stay in registers while k runs
 * over K. The panel (K * 128 B) comes from cache: while a panel computes, its row blocks
 * prefetch the next panel into L2 at an even rate.
 */
#include <stdint.h>
#include <string.h>

#define PANEL 32
#define MR 12 /* 2 * MR accumulators + 2 weight vectors + 1 broadcast fit AVX-512's 32 registers */

typedef float f32x16 __attribute__((vector_size(64)));

static inline f32x16 load16(const float *p) { f32x16 v; memcpy(&v, p, 64); return v; }
static inline void store16(float *p, f32x16 v) { memcpy(p, &v, 64); }

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

/* Rows r0 .. r0 + mr - 1 of y, columns col0 .. col0 + ncols - 1 (one panel). ``mr`` is a
 * constant after inlining, so the accumulator arrays live in registers. */
static inline __attribute__((always_inline)) void block(const float *x, const float *panel, const float *bias32,
                                                         float *y, int K, int N, int ldx, int r0, int mr,
                                                         int col0, int ncols, const float *prefetch,
                                                         int pf_row, int pf_every) {
    f32x16 acc0[MR], acc1[MR];
    f32x16 b0 = load16(bias32), b1 = load16(bias32 + 16);
    for (int r = 0; r < mr; r++) { acc0[r] = b0; acc1[r] = b1; }
    const float *xr = x + (int64_t)r0 * ldx;
    int countdown = 0;
    for (int k = 0; k < K; k++) {
        f32x16 w0 = load16(panel + (int64_t)k * PANEL);
        f32x16 w1 = load16(panel + (int64_t)k * PANEL + 16);
        if (prefetch && --countdown < 0) { /* one row of the next panel into L2 */
            __builtin_prefetch(prefetch + (int64_t)pf_row * PANEL, 0, 2);
            __builtin_prefetch(prefetch + (int64_t)pf_row * PANEL + 16, 0, 2);
            pf_row++;
            countdown = pf_every - 1;
        }
        for (int r = 0; r < mr; r++) {
            float s = xr[(int64_t)r * ldx + k];
            acc0[r] += s * w0;
            acc1[r] += s * w1;
        }
    }
    for (int r = 0; r < mr; r++) {
        float *out = y + (int64_t)(r0 + r) * N + col0;
        if (ncols == PANEL) {
            store16(out, acc0[r]);
            store16(out + 16, acc1[r]);
        } else {
            float tmp[PANEL];
            store16(tmp, acc0[r]);
            store16(tmp + 16, acc1[r]);
            memcpy(out, tmp, sizeof(float) * ncols);
        }
    }
}

#define CASE(n) case n: block(x, panel, bias32, y, K, N, ldx, r0, n, col0, ncols, pf, pf_row, blocks); break;

void small_gemm_f32(const float *x, const float *packed, const float *bias, float *y, int M, int K, int N,
                    int ldx, int n_threads) {
    int panels = (N + PANEL - 1) / PANEL;
    _Pragma("omp parallel for schedule(static) num_threads(n_threads)")
    for (int p = 0; p < panels; p++) {
        const float *panel = packed + (int64_t)p * K * PANEL;
        int col0 = p * PANEL;
        int ncols = N - col0 < PANEL ? N - col0 : PANEL;
        float bias32[PANEL] = {0};
        if (bias) memcpy(bias32, bias + col0, sizeof(float) * ncols);
        /* The next panel streams into L2 while this one computes: row block j of ``blocks``
         * prefetches its j-th share of the next panel's rows, one row every ``blocks`` steps of
         * k, so DRAM is read at an even rate over the whole panel's compute. */
        const int blocks = (M + MR - 1) / MR;
        const float *pf = p + 1 < panels ? panel + (int64_t)K * PANEL : 0;
        for (int r0 = 0; r0 < M; r0 += MR) {
            int mr = M - r0 < MR ? M - r0 : MR;
            int pf_row = (int)((int64_t)(r0 / MR) * K / blocks);
            switch (mr) {
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
                CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
            }
        }
    }
}

/* RMSNorm: out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, for T rows of H values, fp32 or bf16.
 *
 * Why: torch's CPU rms_norm runs as about six ops (pow, mean, add, rsqrt, mul, mul), ~60 us on a
 * decode batch's [32, 576]; a decode step of a 30-layer model calls it 61 times. One pass here.
 * Same math as HF's LlamaRMSNorm: the sum of squares is accumulated in fp32; in bf16 the
 * normalized row is rounded to bf16 before the weight multiplies it, as HF's `.to(input_dtype)`
 * does, and the product is rounded again.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

void rms_norm_f32(const float *x, int ldx, const float *w, float *out, int T, int H, float eps, int n_threads) {
    _Pragma("omp parallel for schedule(static) num_threads(n_threads) if (T >= 64)")
    for (int t = 0; t < T; t++) {
        const float *row = x + (int64_t)t * ldx;
        float *dst = out + (int64_t)t * H;
        float sum = 0.0f;
        for (int i = 0; i < H; i++) sum += row[i] * row[i];
        float inv = 1.0f / sqrtf(sum / (float)H + eps);
        for (int i = 0; i < H; i++) dst[i] = w[i] * (row[i] * inv);
    }
}

void rms_norm_bf16(const uint16_t *x, int ldx, const uint16_t *w, uint16_t *out, int T, int H, float eps,
                   int n_threads) {
    _Pragma("omp parallel for schedule(static) num_threads(n_threads) if (T >= 64)")
    for (int t = 0; t < T; t++) {
        const uint16_t *row = x + (int64_t)t * ldx;
        uint16_t *dst = out + (int64_t)t * H;
        float sum = 0.0f;
        for (int i = 0; i < H; i++) {
            float v = bf16_to_f32(row[i]);
            sum += v * v;
        }
        float inv = 1.0f / sqrtf(sum / (float)H + eps);
        for (int i = 0; i < H; i++)
            dst[i] = f32_to_bf16(bf16_to_f32(w[i]) * round_bf16(bf16_to_f32(row[i]) * inv));
    }
}

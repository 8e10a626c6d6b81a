/* Projections with quantized weights: y[T, N] = x[T, K] W^T (+ bias), W kept in 4/5/6/8-bit blocks.
 *
 * Why: a decode step is bound by the bytes of weights it reads. GGUF models store them in 4-8 bit
 * blocks; dequantizing at load multiplies those bytes by 4-7 (fp32) and the step time with them.
 * Here the weights stay packed and the dot products run on 8-bit integers, as llama.cpp does:
 * each token's activations are quantized per block of 32 to int8 with one fp32 scale
 * (quant_act_q8), and each weight block's integer dot product with them is scaled once.
 *
 * Weight layout (repacked at load by choral/quant/repack.py; every GGUF block type maps to one kind;
 * a row is K / 32 blocks, rows one after another). Every weight is w = scale * q + offset with q an
 * unsigned integer (signed for KIND_Q8) and scale/offset shared by a half block (16 weights):
 *   KIND_Q8 (Q8_0)             36 B: fp32 d, 32 x int8 q                     w = d q
 *   KIND_U4 (Q4_0, Q4_1, Q4_K) 24 B: fp32 d, fp32 m, 16 B nibbles              w = d q + m
 *   KIND_U5 (Q5_0, Q5_1, Q5_K) 28 B: fp32 d, fp32 m, 16 B nibbles, 32-bit plane w = d q + m
 *   KIND_U6 (Q6_K)             32 B: fp32 d0, d1 (per 16), 16 B nibbles, 2 planes  w = d_h (q - 32)
 * Nibble byte j holds q[j] (low) and q[j + 16] (high); plane bit i is bit 4 (or 5) of q[i].
 *
 * Integer dot of a block: with a = da * qa (int8, |qa| <= 127),
 *   sum_i w_i a_i = da * (sum_h d_h sum_{i in h} q_i qa_i) + sum_h m_h * (da * sum_{i in h} qa_i)
 * so the offsets need only each half block's activation sum (as[], precomputed per token).
 * u8 x s8 pair sums stay in int16 (maddubs): 63 * 127 * 2 < 32767 for 6-bit q, 128 * 127 * 2 for
 * the |q| of Q8 blocks (the sign moves to the activation), so no saturation: the int32 sums are
 * exact on every path (maddubs + madd, AVX-VNNI and AVX-512 VNNI dpbusd, scalar).
 *
 * Paths (compile-time, from the target's macros): AVX-512 VNNI (two blocks per 512-bit vector),
 * AVX2 (+ AVX-VNNI's dpbusd where __AVXVNNI__), and a portable scalar one. The scalar path keeps
 * the AVX2 path's 8 float lanes and its order of operations, so the two agree bit for bit (the
 * tests load both builds: quant_matmul.c and quant_matmul_scalar.c include this file); AVX-512
 * sums in 16 lanes and agrees to float rounding. The build passes -fassociative-math to every
 * kernel; the pragma below turns it off here, so gcc keeps that order of float operations.
 */
#pragma GCC optimize("no-associative-math")
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(CHORAL_QUANT_SCALAR) && (defined(__AVX2__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

#if !defined(CHORAL_QUANT_SCALAR) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QPATH_AVX512 1
#elif !defined(CHORAL_QUANT_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define QPATH_AVX2 1
#endif

enum { KIND_Q8 = 0, KIND_U4 = 1, KIND_U5 = 2, KIND_U6 = 3 };
static const int BLOCK_BYTES[4] = {36, 24, 28, 32};

/* Bytes of one 32-weight block of ``kind`` (-1 for an unknown kind). */
int quant_block_bytes(int kind) { return kind >= 0 && kind < 4 ? BLOCK_BYTES[kind] : -1; }

/* Which path this build runs: 0 scalar, 1 AVX2 (maddubs), 2 AVX2 + AVX-VNNI, 3 AVX-512 VNNI. */
int quant_path(void) {
#if defined(QPATH_AVX512)
    return 3;
#elif defined(QPATH_AVX2) && defined(__AVXVNNI__)
    return 2;
#elif defined(QPATH_AVX2)
    return 1;
#else
    return 0;
#endif
}

static inline float load_f32(const uint8_t *p) { float f; memcpy(&f, p, 4); return f; }
static inline uint32_t load_u32(const uint8_t *p) { uint32_t u; memcpy(&u, p, 4); return u; }

/* One row unpacked into L1: q[32 nb] (u8, or int8 bits for KIND_Q8), scv[nb][8] = each block's
 * half scales as the dot's 8 lanes see them (lanes 0-3: first half, 4-7: second), mn[2 nb]. */
typedef struct {
    uint8_t *q;
    float *scv;
    float *mn;
} Row;

static void unpack_row(int kind, const uint8_t *src, int nb, Row r) {
    const int bb = BLOCK_BYTES[kind];
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = src + (int64_t)b * bb;
        uint8_t *q = r.q + 32 * b;
        float s0, s1, m0, m1;
        if (kind == KIND_Q8) {
            s0 = s1 = load_f32(blk);
            m0 = m1 = 0.0f;
            memcpy(q, blk + 4, 32);
        } else {
            const uint8_t *nib = blk + 8;
#if defined(QPATH_AVX2) || defined(QPATH_AVX512)
            __m128i bytes = _mm_loadu_si128((const __m128i *)nib);
            __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
            _mm_storeu_si128((__m128i *)q, lo);
            _mm_storeu_si128((__m128i *)(q + 16), hi);
#else
            for (int j = 0; j < 16; j++) {
                q[j] = nib[j] & 0x0F;
                q[j + 16] = nib[j] >> 4;
            }
#endif
            int planes = kind == KIND_U4 ? 0 : kind == KIND_U5 ? 1 : 2;
            for (int p = 0; p < planes; p++) {
                uint32_t bits = load_u32(blk + 24 + 4 * p);
                for (int i = 0; i < 32; i++)
                    q[i] |= (uint8_t)(((bits >> i) & 1u) << (4 + p));
            }
            if (kind == KIND_U6) {
                s0 = load_f32(blk);
                s1 = load_f32(blk + 4);
                m0 = -32.0f * s0;
                m1 = -32.0f * s1;
            } else {
                s0 = s1 = load_f32(blk);
                m0 = m1 = load_f32(blk + 4);
            }
        }
        for (int l = 0; l < 4; l++) {
            r.scv[8 * b + l] = s0;
            r.scv[8 * b + 4 + l] = s1;
        }
        r.mn[2 * b] = m0;
        r.mn[2 * b + 1] = m1;
    }
}

/* Sum of 8 lanes in a fixed order (both paths use it on the same lane values). */
static inline float sum8(const float *v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

/* One token's dot with one unpacked row: aq[32 nb] int8, ad[nb] block scales, as[2 nb] half sums. */
static float dot_row(int is_signed, Row r, int nb, const int8_t *aq, const float *ad, const float *as) {
    const int nh = 2 * nb;
    float lanes[8];
#if defined(QPATH_AVX512)
    const __m512 zero = _mm512_setzero_ps();
    __m512 acc = zero;
    for (int b = 0; b < nb; b += 2) {
        __mmask64 bm = b + 1 < nb ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu;
        __mmask16 fm = b + 1 < nb ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
        __m512i wq = _mm512_maskz_loadu_epi8(bm, r.q + 32 * b);
        __m512i qa = _mm512_maskz_loadu_epi8(bm, aq + 32 * b);
        if (is_signed) {
            __mmask64 neg = _mm512_movepi8_mask(wq);
            qa = _mm512_mask_sub_epi8(qa, neg, _mm512_setzero_si512(), qa);
            wq = _mm512_abs_epi8(wq);
        }
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, qa);
        __m512 adv = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(ad[b]),
                                          _mm512_set1_ps(b + 1 < nb ? ad[b + 1] : 0.0f));
        __m512 scale = _mm512_mul_ps(_mm512_maskz_loadu_ps(fm, r.scv + 8 * b), adv);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
    }
    int h = 0;
    __m512 accm = zero;
    for (; h + 16 <= nh; h += 16)
        accm = _mm512_fmadd_ps(_mm512_loadu_ps(r.mn + h), _mm512_loadu_ps(as + h), accm);
    float total = _mm512_reduce_add_ps(_mm512_add_ps(acc, accm));
    for (; h < nh; h++) total = fmaf(r.mn[h], as[h], total);
    (void)lanes;
    return total;
#elif defined(QPATH_AVX2)
    __m256 acc = _mm256_setzero_ps();
#if !defined(__AVXVNNI__)
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (int b = 0; b < nb; b++) {
        __m256i wq = _mm256_loadu_si256((const __m256i *)(r.q + 32 * b));
        __m256i qa = _mm256_loadu_si256((const __m256i *)(aq + 32 * b));
        if (is_signed) {
            qa = _mm256_sign_epi8(qa, wq);
            wq = _mm256_sign_epi8(wq, wq);
        }
#if defined(__AVXVNNI__)
        __m256i dot = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wq, qa);
#else
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, qa), ones);
#endif
        __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(r.scv + 8 * b), _mm256_set1_ps(ad[b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc);
    }
    __m256 accm = _mm256_setzero_ps();
    int h = 0;
    for (; h + 8 <= nh; h += 8)
        accm = _mm256_fmadd_ps(_mm256_loadu_ps(r.mn + h), _mm256_loadu_ps(as + h), accm);
    _mm256_storeu_ps(lanes, _mm256_add_ps(acc, accm));
#else
    float acc[8] = {0}, accm[8] = {0};
    for (int b = 0; b < nb; b++) {
        const uint8_t *wq = r.q + 32 * b;
        const int8_t *qa = aq + 32 * b;
        for (int l = 0; l < 8; l++) {
            int32_t dot = 0;
            for (int i = 4 * l; i < 4 * l + 4; i++)
                dot += (is_signed ? (int32_t)(int8_t)wq[i] : (int32_t)wq[i]) * (int32_t)qa[i];
            float scale = r.scv[8 * b + l] * ad[b];
            acc[l] = fmaf((float)dot, scale, acc[l]);
        }
    }
    int h = 0;
    for (; h + 8 <= nh; h += 8)
        for (int l = 0; l < 8; l++) accm[l] = fmaf(r.mn[h + l], as[h + l], accm[l]);
    for (int l = 0; l < 8; l++) lanes[l] = acc[l] + accm[l];
#endif
#if !defined(QPATH_AVX512)
    float total = sum8(lanes);
    for (; h < nh; h++) total = fmaf(r.mn[h], as[h], total);
    return total;
#endif
}

/* Activations x[T, K] (row stride ldx floats) -> per token aq[K] int8, ad[K / 32] block scales
 * (amax / 127, as llama.cpp's Q8_0) and as[K / 16] = ad * (sum of the half block's aq). */
void quant_act_q8(const float *x, int ldx, int T, int K, int8_t *aq, float *ad, float *as, int threads) {
    const int nb = K / 32;
#pragma omp parallel for num_threads(threads) schedule(static) if (T > 1)
    for (int t = 0; t < T; t++) {
        const float *xt = x + (int64_t)t * ldx;
        for (int b = 0; b < nb; b++) {
            const float *xb = xt + 32 * b;
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
            float d = amax / 127.0f;
            float id = d != 0.0f ? 1.0f / d : 0.0f;
            int8_t *qb = aq + (int64_t)t * K + 32 * b;
            int s0 = 0, s1 = 0;
            for (int i = 0; i < 32; i++) {
                int v = (int)roundf(xb[i] * id);
                v = v > 127 ? 127 : v < -127 ? -127 : v;
                qb[i] = (int8_t)v;
                if (i < 16) s0 += v; else s1 += v;
            }
            ad[(int64_t)t * nb + b] = d;
            as[(int64_t)t * 2 * nb + 2 * b] = d * (float)s0;
            as[(int64_t)t * 2 * nb + 2 * b + 1] = d * (float)s1;
        }
    }
}

static int alloc_row(Row *r, int nb) {
    r->q = aligned_alloc(64, ((size_t)nb * 32 + 63) / 64 * 64);
    r->scv = malloc((size_t)nb * 8 * sizeof(float));
    r->mn = malloc((size_t)nb * 2 * sizeof(float));
    return r->q && r->scv && r->mn;
}

static void free_row(Row *r) { free(r->q); free(r->scv); free(r->mn); }

/* y[t, n] (row stride ldy) = sum_k x[t, k] W[n, k] (+ bias[n]) for the T quantized tokens.
 * Threads take output rows; each row is unpacked once into L1 and dotted with every token.
 * Returns 0, or -1 when a thread's row buffer could not be allocated (y is then incomplete). */
int quant_matmul(int kind, const uint8_t *w, int N, int K, const int8_t *aq, const float *ad, const float *as,
                 int T, const float *bias, float *y, int ldy, int threads) {
    const int nb = K / 32;
    const int64_t row_bytes = (int64_t)nb * BLOCK_BYTES[kind];
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        Row r;
        if (!alloc_row(&r, nb)) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int n = 0; n < N; n++) {
                unpack_row(kind, w + n * row_bytes, nb, r);
                float b = bias ? bias[n] : 0.0f;
                for (int t = 0; t < T; t++)
                    y[(int64_t)t * ldy + n] = dot_row(kind == KIND_Q8, r, nb, aq + (int64_t)t * K, ad + (int64_t)t * nb,
                                                     as + (int64_t)t * 2 * nb) + b;
            }
        }
        free_row(&r);
    }
    return failed ? -1 : 0;
}

/* out[i, :] = W[rows[i], :] in fp32 (rows == NULL: rows row0 .. row0 + nrows - 1), each weight
 * as fmaf(q, scale, offset). Used for embedding lookups and for the weight panels of large batches.
 * Returns 0, or -1 when a thread's row buffer could not be allocated. */
int quant_dequant_rows(int kind, const uint8_t *w, int K, const int64_t *rows, int nrows, int64_t row0, float *out,
                       int threads) {
    const int nb = K / 32;
    const int64_t row_bytes = (int64_t)nb * BLOCK_BYTES[kind];
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed) if (nrows > 8)
    {
        Row r;
        if (!alloc_row(&r, nb)) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int i = 0; i < nrows; i++) {
                int64_t n = rows ? rows[i] : row0 + i;
                unpack_row(kind, w + n * row_bytes, nb, r);
                float *o = out + (int64_t)i * K;
                for (int k = 0; k < K; k++) {
                    int h = k >> 4;
                    float q = kind == KIND_Q8 ? (float)(int8_t)r.q[k] : (float)r.q[k];
                    o[k] = fmaf(q, r.scv[8 * (h >> 1) + 4 * (h & 1)], r.mn[h]);
                }
            }
        }
        free_row(&r);
    }
    return failed ? -1 : 0;
}

/* quant_act_q8 then quant_matmul in one call: what a projection runs per step (one crossing from
 * Python instead of two, no activation tensors allocated there). Returns 0, or -1 out of memory. */
int quant_linear(int kind, const uint8_t *w, int N, int K, const float *x, int ldx, int T, const float *bias,
                 float *y, int ldy, int threads) {
    const int nb = K / 32;
    int8_t *aq = malloc((size_t)T * K);
    float *ad = malloc((size_t)T * nb * sizeof(float));
    float *as = malloc((size_t)T * 2 * nb * sizeof(float));
    int status = -1;
    if (aq && ad && as) {
        quant_act_q8(x, ldx, T, K, aq, ad, as, threads);
        status = quant_matmul(kind, w, N, K, aq, ad, as, T, bias, y, ldy, threads);
    }
    free(aq);
    free(ad);
    free(as);
    return status;
}

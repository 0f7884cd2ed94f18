/* The small steps of CPU decode between the products: attention of one new token over its cached
   keys, and RMSNorm. At batch 1 a decoder layer is ~4 products and ~20 small tensor ops; eager
   PyTorch spends 5-30 us on each of the small ones (dispatch, allocation, a thread-pool wake-up
   for the attention), which at 30 thin layers cost as much as the products (SmolLM2-135M: ~5 ms
   of ~12 ms per token). Here each is one call. Compiled into the same library as cpu_gemv.c;
   the torch references are in cpu_decode.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

/* q . k and o += w v over one head, for keys stored fp32 or bf16; `omp simd reduction` lets the
   compiler reassociate the sum into vector lanes (a plain loop would stay scalar). */
#define HEAD_OPS(T, LOAD)                                                                   \
    static inline float dot_##T(const float *q, const T *k, int D) {                        \
        float s = 0.0f;                                                                     \
        _Pragma("omp simd reduction(+:s)")                                                  \
        for (int i = 0; i < D; i++) s += q[i] * LOAD(k[i]);                                 \
        return s;                                                                           \
    }                                                                                       \
    static inline void axpy_##T(float w, const T *v, float *o, int D) {                     \
        _Pragma("omp simd")                                                                 \
        for (int i = 0; i < D; i++) o[i] += w * LOAD(v[i]);                                 \
    }
#define AS_IS(x) (x)
HEAD_OPS(float, AS_IS)
HEAD_OPS(uint16_t, bf16_f32)

/* Decode attention: query b (one token, H heads of D) attends over the S_b keys its sequence has
   so far, read from cache rows rows[b, 0..S_b-1] (a contiguous cache's positions, or the paged
   pool's rows through the block table: no gather copy). Head h reads kv head h / (H / Hkv) (GQA).
     q (B, H, D) fp32 (sequence b's at q + b q_stride), k (rows, Hkv, D), v (rows, Hkv, Dv) fp32
     or bf16, out (B, H, Dv) fp32.
   softmax in fp32 with the maximum subtracted, as SDPA. attend_head does one (b, h), with p a
   buffer of S_b floats for its scores. */
/* The scores of 16 keys at once (AVX-512): each key's q . k in one register of 16 partial sums,
   then the 16 registers summed across their lanes together, in 45 shuffles and adds instead of
   16 reductions of ~8 each (a reduction per key cost as much as its products: ~18 ns per head
   and key here, 11 with this). The same sums in another order. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 k16(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 k16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 pair_sum(__m512 a, __m512 b) {   /* 128-bit lanes: a0+a2, b0+b2, a1+a3, b1+b3 */
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
static inline __m512 quad_sum(__m512 ab, __m512 cd) {  /* lanes: a, b, c, d partial sums */
    const __m512d x = _mm512_castps_pd(ab), y = _mm512_castps_pd(cd);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
static inline __m512 lane_sum(__m512 t, __m512 u) {    /* 4 lanes of t, 4 of u -> 2 + 2 */
    return _mm512_add_ps(_mm512_shuffle_f32x4(t, u, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t, u, _MM_SHUFFLE(3, 1, 3, 1)));
}
static inline __m512 sum16(const __m512 a[16]) {     /* -> (sum a[0], ..., sum a[15]) */
    __m512 t[4];
    for (int i = 0; i < 4; i++)
        t[i] = quad_sum(pair_sum(a[4 * i], a[4 * i + 1]), pair_sum(a[4 * i + 2], a[4 * i + 3]));
    return lane_sum(lane_sum(t[0], t[1]), lane_sum(t[2], t[3]));
}
#define SCORES16(T, LOAD)                                                                   \
    for (; j + 16 <= n; j += 16) {                                                          \
        __m512 a[16];                                                                       \
        for (int i = 0; i < 16; i++) {                                                      \
            const T *kj = (const T *)k + (rows[b * S + j + i] * Hkv + hk) * D;              \
            a[i] = _mm512_mul_ps(_mm512_loadu_ps(qh), LOAD(kj));                            \
            for (int d = 16; d < D; d += 16) a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), LOAD(kj + d), a[i]); \
        }                                                                                   \
        _mm512_storeu_ps(p + j, _mm512_mul_ps(_mm512_set1_ps(scale), sum16(a)));            \
    }
#else
#define SCORES16(T, LOAD)
#endif

#define ATTEND(T, LOAD16)                                                                   \
    int64_t j = 0;                                                                          \
    if (D % 16 == 0) { SCORES16(T, LOAD16) }                                                \
    for (; j < n; j++) p[j] = scale * dot_##T(qh, (const T *)k + (rows[b * S + j] * Hkv + hk) * D, D); \
    for (j = 0; j < n; j++) mx = p[j] > mx ? p[j] : mx;                                     \
    _Pragma("omp simd reduction(+:sum)")                                                    \
    for (int64_t j = 0; j < n; j++) sum += (p[j] = exp_neg(p[j] - mx));                     \
    for (int64_t j = 0; j < n; j++)                                                         \
        axpy_##T(p[j] / sum, (const T *)v + (rows[b * S + j] * Hkv + hk) * Dv, o, Dv);

/* D and Dv constants where they are the common head sizes: the loops unroll (~20% faster) */
static inline __attribute__((always_inline)) void attend_impl(
        int64_t b, int h, int H, int Hkv, const int D, const int Dv, int64_t S, const float *q, int64_t q_stride,
        const void *k, const void *v, int kv_bf16, const int64_t *rows, const int64_t *lens,
        float scale, float *out, float *p) {
    const int64_t hk = h / (H / Hkv), n = lens[b];
    const float *qh = q + b * q_stride + h * D;
    float *o = out + (b * H + h) * Dv, mx = -INFINITY, sum = 0.0f;
    memset(o, 0, Dv * sizeof(float));
    if (kv_bf16) {
        ATTEND(uint16_t, k16_bf16)
    } else {
        ATTEND(float, k16)
    }
}

void attend_head(int64_t b, int h, int H, int Hkv, int D, int Dv, int64_t S, const float *q, int64_t q_stride,
                 const void *k, const void *v, int kv_bf16, const int64_t *rows, const int64_t *lens,
                 float scale, float *out, float *p) {
    if (D == 64 && Dv == 64)
        attend_impl(b, h, H, Hkv, 64, 64, S, q, q_stride, k, v, kv_bf16, rows, lens, scale, out, p);
    else if (D == 128 && Dv == 128)
        attend_impl(b, h, H, Hkv, 128, 128, S, q, q_stride, k, v, kv_bf16, rows, lens, scale, out, p);
    else
        attend_impl(b, h, H, Hkv, D, Dv, S, q, q_stride, k, v, kv_bf16, rows, lens, scale, out, p);
}

void attend_decode(int B, int H, int Hkv, int D, int Dv, int64_t S, const float *q, int64_t q_stride,
                   const void *k, const void *v, int kv_bf16, const int64_t *rows, const int64_t *lens,
                   float scale, float *out, int threads) {
    _Pragma("omp parallel num_threads(threads)")
    {
        float *p = malloc((S > 0 ? S : 1) * sizeof(float));
        _Pragma("omp for schedule(static)")
        for (int64_t t = 0; t < (int64_t)B * H; t++)
            attend_head(t / H, t % H, H, Hkv, D, Dv, S, q, q_stride, k, v, kv_bf16, rows, lens, scale, out, p);
        free(p);
    }
}

/* RMSNorm of R rows of C: out = x / sqrt(mean(x^2) + eps) * w, fp32. bf16: a bf16 model's
   values (held in fp32), rounded where transformers' order rounds: w * bf16(x / rms(x)), rounded. */
void rmsnorm(int64_t R, int64_t C, const float *x, const float *w, float eps, int bf16, float *out) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * C;
        float ss = 0.0f;
        _Pragma("omp simd reduction(+:ss)")
        for (int64_t i = 0; i < C; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / C + eps);
        for (int64_t i = 0; i < C; i++)
            out[r * C + i] = bf16 ? round_bf16(w[i] * round_bf16(xr[i] * inv)) : xr[i] * inv * w[i];
    }
}

/* What a decoder's attention does to the new token's fused q|k|v row before attending, in place:
   qkv (B, (H + 2 Hkv) D) fp32. Optional per-head RMSNorm of q and k heads (Qwen3's q_norm and
   k_norm: weights of D, NULL when absent), then the rotation of q and k heads by cos and sin (B, D)
   in the halves layout (x[i], x[i + D/2] pairs, as transformers' rotate_half; NULL: no rotary),
   then k and v heads are stored in cache row write_rows[b] (k, v: (rows, Hkv, D) fp32 or bf16). */
void qkv_store(int B, int H, int Hkv, int D, float *qkv, const float *q_norm, const float *k_norm,
               float eps, const float *cos, const float *sin, void *k, void *v, int kv_bf16,
               const int64_t *write_rows) {
    const int half = D / 2;
    for (int b = 0; b < B; b++) {
        float *row = qkv + (int64_t)b * (H + 2 * Hkv) * D;
        for (int h = 0; h < H + Hkv; h++) {
            float *x = row + h * D;
            const float *w = h < H ? q_norm : k_norm;
            if (w) rmsnorm(1, D, x, w, eps, 0, x);             /* in place */
            if (cos) {
                const float *c = cos + (int64_t)b * D, *s = sin + (int64_t)b * D;
                for (int i = 0; i < half; i++) {
                    const float x1 = x[i], x2 = x[i + half];
                    x[i] = x1 * c[i] - x2 * s[i];
                    x[i + half] = x2 * c[i + half] + x1 * s[i + half];
                }
            }
        }
        const int64_t at = write_rows[b] * Hkv * D;
        const float *kn = row + H * D, *vn = row + (H + Hkv) * D;
        for (int i = 0; i < Hkv * D; i++) {
            if (kv_bf16) {
                ((uint16_t *)k)[at + i] = f32_bf16(kn[i]);
                ((uint16_t *)v)[at + i] = f32_bf16(vn[i]);
            } else {
                ((float *)k)[at + i] = kn[i];
                ((float *)v)[at + i] = vn[i];
            }
        }
    }
}

/* The gated MLP's middle: gu (M, 2 I) = [gate | up] -> out (M, I) = silu(gate) * up, fp32; bf16:
   rounded as torch rounds bf16 tensors, silu(gate) and then its product. */
void silu_mul(int64_t M, int64_t I, const float *gu, int bf16, float *out) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < I; i++) {
            const float g = gu[m * 2 * I + i], u = gu[m * 2 * I + I + i], s = g / (1.0f + expf(-g));
            out[m * I + i] = bf16 ? round_bf16(round_bf16(s) * u) : s * u;
        }
}

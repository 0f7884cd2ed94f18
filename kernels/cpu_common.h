/* What the CPU kernel files (one library: cpu_gemv.c, cpu_decode.c, cpu_step.c) share: bf16 <->
   fp32 as torch does them, the products' description of a weight, and the entry points that
   cpu_step.c calls from inside its one parallel region. */
#ifndef MINILLM_CPU_COMMON_H
#define MINILLM_CPU_COMMON_H
#include <stdint.h>
#include <string.h>

static inline float bf16_f32(uint16_t h) {   /* bf16 is the top half of an fp32 */
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) {   /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);   /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static inline float round_bf16(float f) { return bf16_f32(f32_bf16(f)); }   /* an fp32 holding a bf16 */

/* e^x for x <= 0 (softmax scores less their maximum), written so that a `#pragma omp simd` loop
   vectorizes it (libm's expf is a scalar call, ~40% of decode attention's time at 512 keys):
   e^x = 2^n e^u with n = round(x log2 e), u = x - n ln 2 in [-0.35, 0.35], e^u by its Taylor series
   to u^7 (truncation < 6e-9, under fp32's rounding), 2^n put in the exponent bits. Below -87, 0. */
static inline float exp_neg(float x) {
    const float t = x * 1.44269504088896341f, n = __builtin_rintf(t < -126.0f ? -126.0f : t);
    const float u = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;   /* ln 2 in two parts */
    float e = 1.0f / 5040;
    e = e * u + 1.0f / 720, e = e * u + 1.0f / 120, e = e * u + 1.0f / 24, e = e * u + 1.0f / 6;
    e = e * u + 0.5f, e = e * u + 1.0f, e = e * u + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return t < -126.0f ? 0.0f : e * scale;
}

/* -- products (cpu_gemv.c) ------------------------------------------------------------------ */
enum { W_F32, W_BF16, W_INT8, W_INT4 };
typedef struct {            /* one weight as the products read it: (N, K), blocks of 32 along K */
    int kind;               /* W_*: q is (N, K) fp32 / bf16 / int8, or (N, K/2) uint8 (Q4 block order) */
    int round_x;            /* int8/int4: x rounded to int8 per 32 (integer products), else fp32 x */
    int64_t N, K, G;        /* G: columns per scale (32, 64, 128 or K) */
    const void *q;
    const _Float16 *d, *m;  /* (N, K/G) scales and (int4) minimums */
} Weight;

typedef struct {            /* x (M, K) fp32 as one product reads it, made once by gemv_prepare */
    int M;
    const float *x;
    int8_t *xq;             /* round_x: x rounded, (M, K) */
    float *dx, *xs;         /* round_x: its scales (M, K/32); int4: group sums (M, K/G) of x as read */
    uint16_t *xb;           /* bf16 weights on AVX512-BF16: x as bf16 (M, K) when that is exact, else NULL */
} Input;

enum { OUT_ADD = 1, OUT_BF16 = 2 };   /* y += result; results rounded to bf16 (values kept in fp32) */
/* the buffers an Input over rows of up to K columns needs: xq (M K bytes), dx and xs (M K / 32
   floats each), xb (M K uint16) */
void gemv_prepare(const Weight *w, Input *in);
/* thread t of T computes rows [split(N, t, T), split(N, t + 1, T)): whole groups of 4 rows (the
   4-row loops), so each row is summed the same way whatever the thread count */
static inline int64_t split(int64_t N, int t, int T) { return t == T ? N : N / 4 * t / T * 4; }
void gemv_range(const Weight *w, const Input *in, float *y, int64_t ldy, int64_t n0, int64_t n1, int mode);

/* -- decode's small steps (cpu_decode.c) ---------------------------------------------------- */
void attend_head(int64_t b, int h, int H, int Hkv, int D, int Dv, int64_t S, const float *q, int64_t q_stride,
                 const void *k, const void *v, int kv_bf16, const int64_t *rows, const int64_t *lens,
                 float scale, float *out, float *p);
void rmsnorm(int64_t R, int64_t C, const float *x, const float *w, float eps, int bf16, float *out);
void silu_mul(int64_t M, int64_t I, const float *gu, int bf16, float *out);
void qkv_store(int B, int H, int Hkv, int D, float *qkv, const float *q_norm, const float *k_norm,
               float eps, const float *cos, const float *sin, void *k, void *v, int kv_bf16,
               const int64_t *write_rows);
#endif

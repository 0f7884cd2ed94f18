/* CPU products for decode: y (M, N) = x (M, K) @ W.T for few rows M, W stored bf16, int8 or int4.

   At batch 1 a decoder reads every weight once per token and does two flops per weight, so
   these products run at whatever share of the memory bandwidth the loop keeps busy. BLAS and
   oneDNN are built for blocks of rows: at one row their bf16 and weight-only int8/int4 paths are
   compute-bound (bf16 here reads ~12 GB/s where a plain stream reads ~20). These loops use
   AVX-512 or AVX2 intrinsics (whichever -march=native gives, Intel or AMD alike; plain C
   elsewhere): every inner loop runs over 16 or 32 independent lanes, so no horizontal sum happens
   inside a row, and one row's weights are read once for all M rows of x.

   Formats (row n, element k; blocks of 32 along k; G = columns per scale: 32, 64, 128 or K):
     bf16   w[n, k]  = bf16(W[n, k])
     int8   w[n, k]  = q[n, k] * d[n, k / G]                       q int8; G = K: per channel
     int4   w[n, k]  = q[n, k] * d[n, k / G] + m[n, k / G]         q in 0..15
            a block's 32 values sit in 16 bytes: byte j holds value j (low nibble) and value
            j + 16 (high nibble). This is llama.cpp's Q4_0/Q4_1 block order, so those GGUF
            tensors load as their bytes (Q4_0: m = -8 d).
   d and m are fp16 (as GGUF's; ~3 significant digits, the quantizer rounds them first).
   x and y are fp32 (or bf16 with bf16 weights). The torch references are in cpu_gemv.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define MAX_ROWS 8   /* rows of x per pass over the weights: 8 x 32 fp32 lanes fit the registers */


/* Each kernel is a row body, `static inline` over a constant M: the dispatcher below calls it
   with M = 1..8 spelled out, so the compiler unrolls the loops over rows of x and keeps
   acc[m][0..31] in vector registers. Threads split the weight rows; each row's 32 lanes are
   summed once, at its end. */
#define ALWAYS static inline __attribute__((always_inline))
#define DISPATCH(ROW, ...)                                                                 \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                     \
    for (int64_t n = 0; n < N; n++) {                                                     \
        switch (M) {                                                                      \
        case 1: ROW(1, n, __VA_ARGS__); break;                                            \
        case 2: ROW(2, n, __VA_ARGS__); break;                                            \
        case 3: ROW(3, n, __VA_ARGS__); break;                                            \
        case 4: ROW(4, n, __VA_ARGS__); break;                                            \
        case 5: ROW(5, n, __VA_ARGS__); break;                                            \
        case 6: ROW(6, n, __VA_ARGS__); break;                                            \
        case 7: ROW(7, n, __VA_ARGS__); break;                                            \
        case 8: ROW(8, n, __VA_ARGS__); break;                                            \
        }                                                                                 \
    }

/* V: 16 fp32 lanes, one AVX-512 register or two AVX2 ones (plain C elsewhere). Loads widen
   weights to fp32: int8 (sign-extend), a Q4 block half (low or high nibbles of 16 bytes), bf16
   (the top half of an fp32). Intrinsics, because GCC 12 turns the same loops written in plain C
   or vector extensions into one scalar conversion per lane. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
typedef __m512 V;
ALWAYS V v_zero(void) { return _mm512_setzero_ps(); }
ALWAYS V v_set(float a) { return _mm512_set1_ps(a); }
ALWAYS V v_load(const float *p) { return _mm512_loadu_ps(p); }
ALWAYS V v_fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
ALWAYS V v_mul(V a, V b) { return _mm512_mul_ps(a, b); }
ALWAYS V v_add(V a, V b) { return _mm512_add_ps(a, b); }
ALWAYS float v_sum(V a) { return _mm512_reduce_add_ps(a); }
ALWAYS V v_int8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
ALWAYS V v_nibbles(const uint8_t *p, int high) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    if (high) b = _mm_srli_epi16(b, 4);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, _mm_set1_epi8(15))));
}
ALWAYS V v_bf16(const uint16_t *p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef struct { __m256 a, b; } V;
ALWAYS V v_zero(void) { return (V){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
ALWAYS V v_set(float a) { return (V){_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
ALWAYS V v_load(const float *p) { return (V){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
ALWAYS V v_fma(V a, V b, V c) { return (V){_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
ALWAYS V v_mul(V a, V b) { return (V){_mm256_mul_ps(a.a, b.a), _mm256_mul_ps(a.b, b.b)}; }
ALWAYS V v_add(V a, V b) { return (V){_mm256_add_ps(a.a, b.a), _mm256_add_ps(a.b, b.b)}; }
ALWAYS float v_sum(V a) {
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(a.a, a.b));
    return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
ALWAYS V v_int8(const int8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    return (V){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
               _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
ALWAYS V v_nibbles(const uint8_t *p, int high) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    if (high) b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(15));
    return (V){_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
               _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
ALWAYS V v_bf16(const uint16_t *p) {
    __m256i u = _mm256_loadu_si256((const __m256i *)p);
    __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(u)), 16);
    __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(u, 1)), 16);
    return (V){_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi)};
}
#else   /* portable C: correct everywhere, as fast as the compiler makes it */
typedef struct { float f[16]; } V;
ALWAYS V v_zero(void) { V r = {{0}}; return r; }
ALWAYS V v_set(float a) { V r; for (int j = 0; j < 16; j++) r.f[j] = a; return r; }
ALWAYS V v_load(const float *p) { V r; memcpy(r.f, p, 64); return r; }
ALWAYS V v_fma(V a, V b, V c) { for (int j = 0; j < 16; j++) c.f[j] += a.f[j] * b.f[j]; return c; }
ALWAYS V v_mul(V a, V b) { for (int j = 0; j < 16; j++) a.f[j] *= b.f[j]; return a; }
ALWAYS V v_add(V a, V b) { for (int j = 0; j < 16; j++) a.f[j] += b.f[j]; return a; }
ALWAYS float v_sum(V a) { float s = 0; for (int j = 0; j < 16; j++) s += a.f[j]; return s; }
ALWAYS V v_int8(const int8_t *p) { V r; for (int j = 0; j < 16; j++) r.f[j] = p[j]; return r; }
ALWAYS V v_nibbles(const uint8_t *p, int high) {
    V r;
    for (int j = 0; j < 16; j++) r.f[j] = high ? p[j] >> 4 : p[j] & 15;
    return r;
}
ALWAYS V v_bf16(const uint16_t *p) {
    V r;
    for (int j = 0; j < 16; j++) r.f[j] = bf16_f32(p[j]);
    return r;
}
#endif

/* acc[m] += x[m, k:k+32] * (w0, w1): one block of 32 weights, already fp32 */
ALWAYS void block(const int M, V acc[][2], const float *x, int64_t K, int64_t k, V w0, V w1) {
    for (int m = 0; m < M; m++) {
        acc[m][0] = v_fma(v_load(x + m * K + k), w0, acc[m][0]);
        acc[m][1] = v_fma(v_load(x + m * K + k + 16), w1, acc[m][1]);
    }
}

ALWAYS void store(const int M, V acc[][2], const float *extra, float *y, int64_t ldy, int64_t n) {
    for (int m = 0; m < M; m++)
        y[m * ldy + n] = v_sum(v_add(acc[m][0], acc[m][1])) + (extra ? extra[m] : 0.0f);
}

#define ZERO(acc) for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = v_zero()

ALWAYS void row_bf16(const int M, int64_t n, int64_t K, const float *x, const uint16_t *w,
                     float *y, int64_t ldy) {
    V acc[M][2];
    ZERO(acc);
    const uint16_t *wr = w + n * K;
    for (int64_t k = 0; k < K; k += 32) block(M, acc, x, K, k, v_bf16(wr + k), v_bf16(wr + k + 16));
    store(M, acc, 0, y, ldy, n);
}

ALWAYS void row_f32(const int M, int64_t n, int64_t K, const float *x, const float *w,
                    float *y, int64_t ldy) {
    V acc[M][2];
    ZERO(acc);
    const float *wr = w + n * K;
    for (int64_t k = 0; k < K; k += 32) block(M, acc, x, K, k, v_load(wr + k), v_load(wr + k + 16));
    store(M, acc, 0, y, ldy, n);
}

/* int8 and int4 weights with fp32 activations ("exact": the product of x with the dequantized
   weight, to fp32 rounding; what an as-stored GGUF file runs, so that it equals transformers'
   reading of the file). The weights are widened to fp32 in registers; compute-bound, ~1.4x slower
   than the integer products below. int4: sum_k x_k (q_k d + m) = d sum_k x_k q_k + m sum_k x_k,
   the group sums of x (xsum, (M, K/G)) computed once per call. */
ALWAYS void row_int8_fx(const int M, int64_t n, int64_t K, int64_t G, const float *x, const int8_t *q,
                        const _Float16 *d, float *y, int64_t ldy) {
    V acc[M][2];
    ZERO(acc);
    const int8_t *qr = q + n * K;
    const _Float16 *dr = d + n * (K / G);
    for (int64_t g = 0; g < K / G; g++) {                    /* a group: one scale */
        V scale = v_set((float)dr[g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32)
            block(M, acc, x, K, k, v_mul(scale, v_int8(qr + k)), v_mul(scale, v_int8(qr + k + 16)));
    }
    store(M, acc, 0, y, ldy, n);
}

ALWAYS void row_int4_fx(const int M, int64_t n, int64_t K, int64_t G, const float *x, const float *xsum,
                        const uint8_t *q, const _Float16 *d, const _Float16 *mins, float *y, int64_t ldy) {
    V acc[M][2];
    float extra[M];
    ZERO(acc);
    const int64_t groups = K / G;
    const uint8_t *qr = q + n * (K / 2);
    const _Float16 *dr = d + n * groups, *mr = mins + n * groups;
    for (int64_t g = 0; g < groups; g++) {
        V scale = v_set((float)dr[g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
            const uint8_t *b = qr + k / 2;
            block(M, acc, x, K, k, v_mul(scale, v_nibbles(b, 0)), v_mul(scale, v_nibbles(b, 1)));
        }
    }
    for (int m = 0; m < M; m++) {
        extra[m] = 0.0f;
        for (int64_t g = 0; g < groups; g++) extra[m] += (float)mr[g] * xsum[m * groups + g];
    }
    store(M, acc, extra, y, ldy, n);
}

/* -- int8 and int4 weights: integer dot products, as llama.cpp's Q8_0 x Q4_0 / Q4_1 --------------
   Widening every weight to fp32 costs more than reading it: these products are compute-bound in
   fp32 (int4 ~10 G weights/s per core here). So x is quantized too, once per call, to int8 in
   blocks of 32 (xq = round(x / dx), dx = max|x| / 127: llama.cpp's Q8_0 activations), and each
   weight block's sum_j q_j xq_j is one integer dot product (AVX512-VNNI / AVX-VNNI vpdpbusd, or
   AVX2's vpmaddubsw + vpmaddwd), scaled by d dx in fp32:
       y = sum_blocks d dx sum_j q_j xq_j   (+ for int4: sum_groups m sum_{k in group} dx xq_k)
   The error this adds is x's rounding, ~0.4% of a block's largest |x| per value (random signs).
   A prefill (quant.Packed.mm, more rows) multiplies the same rounded x, as floats, with the
   dequantized weight: cached decoding computes what a full forward does. This is what
   `--quantize int8|int4` runs (its quality is measured against fp32 either way). */
#if defined(__AVX2__) && defined(__FMA__)
typedef __m256i I8x32;
ALWAYS I8x32 i8_load(const int8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
ALWAYS I8x32 q4_load(const uint8_t *p) {   /* 16 bytes -> the block's 32 values, in order */
    __m128i r = _mm_loadu_si128((const __m128i *)p);
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(r), _mm_srli_epi16(r, 4), 1);
    return _mm256_and_si256(v, _mm256_set1_epi8(15));
}
/* sum over groups of 4 of u[j] * s[j]: u unsigned (0..127 here), s signed; 8 int32 lanes */
ALWAYS __m256i dot_us(__m256i u, __m256i s) {
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else   /* no saturation: |u s| <= 127 * 127, pairs <= 32258 */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
ALWAYS __m256i dot_ss(__m256i w, __m256i s) {   /* both signed: |w| times s with w's sign */
    return dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w));
}
typedef __m256 F8;
ALWAYS F8 f8_zero(void) { return _mm256_setzero_ps(); }
ALWAYS F8 f8_fma(__m256i p, float scale, F8 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc);
}
ALWAYS float f8_sum(F8 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#else   /* plain C, the same integers */
typedef struct { int8_t v[32]; } I8x32;
ALWAYS I8x32 i8_load(const int8_t *p) { I8x32 r; memcpy(r.v, p, 32); return r; }
ALWAYS I8x32 q4_load(const uint8_t *p) {
    I8x32 r;
    for (int j = 0; j < 16; j++) { r.v[j] = p[j] & 15; r.v[j + 16] = p[j] >> 4; }
    return r;
}
ALWAYS int32_t dot_ss(I8x32 w, I8x32 s) { int32_t t = 0; for (int j = 0; j < 32; j++) t += w.v[j] * s.v[j]; return t; }
ALWAYS int32_t dot_us(I8x32 w, I8x32 s) { return dot_ss(w, s); }
typedef float F8;
ALWAYS F8 f8_zero(void) { return 0.0f; }
ALWAYS F8 f8_fma(int32_t p, float scale, F8 acc) { return acc + (float)p * scale; }
ALWAYS float f8_sum(F8 a) { return a; }
#endif

/* x (M, K) -> xq (M, K) int8, dx (M, K/32) and xs (M, K/32) = dx sum_j xq_j (the block sum of
   the rounded x, for int4's m term: a prefill, which multiplies the rounded x as floats, gets the
   same sum); round half to even, as torch.round */
static void quantize_x(int M, int64_t K, const float *x, int8_t *xq, float *dx, float *xs) {
    for (int64_t b = 0; b < M * K / 32; b++) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[32 * b + j]));
        float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) sum += xq[32 * b + j] = (int8_t)nearbyintf(x[32 * b + j] * inv);
        dx[b] = scale;
        xs[b] = scale * (float)sum;
    }
}

/* Two blocks per step, into two accumulators per row of x: the FMA chains interleave. A block's
   scale is d[n, block >> sh] * dx[m, block]: sh = log2(G / 32) (G is 32, 64 or 128), or one group
   per row (G = K, int8 per channel, K / 32 blocks of any count): a shift past every block index. */
static inline int group_shift(int64_t K, int64_t G) { return G == K ? 62 : __builtin_ctzll(G / 32); }
#define SCALE(m, b) ((float)dr[(b) >> sh] * dx[(m) * nb + (b)])
#define BLOCK_LOOP(LOAD, DOT)                                                               \
    int64_t b = 0;                                                                          \
    for (; b + 1 < nb; b += 2) {                                                            \
        I8x32 w0 = LOAD(b), w1 = LOAD(b + 1);                                               \
        for (int m = 0; m < M; m++) {                                                       \
            const int8_t *xm = xq + m * K;                                                  \
            acc[m] = f8_fma(DOT(w0, i8_load(xm + 32 * b)), SCALE(m, b), acc[m]);             \
            acc2[m] = f8_fma(DOT(w1, i8_load(xm + 32 * b + 32)), SCALE(m, b + 1), acc2[m]);  \
        }                                                                                   \
    }                                                                                       \
    if (b < nb) {                                                                           \
        I8x32 w0 = LOAD(b);                                                                 \
        for (int m = 0; m < M; m++)                                                         \
            acc[m] = f8_fma(DOT(w0, i8_load(xq + m * K + 32 * b)), SCALE(m, b), acc[m]);     \
    }

ALWAYS void row_int8(const int M, int64_t n, int64_t K, int64_t G, const int8_t *xq, const float *dx,
                     const int8_t *q, const _Float16 *d, float *y, int64_t ldy) {
    const int64_t nb = K / 32;
    const int sh = group_shift(K, G);
    F8 acc[M], acc2[M];
    for (int m = 0; m < M; m++) acc[m] = acc2[m] = f8_zero();
    const _Float16 *dr = d + n * (K / G);
    const int8_t *qr = q + n * K;
#define LOAD8(b) i8_load(qr + 32 * (b))
    BLOCK_LOOP(LOAD8, dot_ss)
    for (int m = 0; m < M; m++) y[m * ldy + n] = f8_sum(acc[m]) + f8_sum(acc2[m]);
}

/* int4's m term: sum_groups m_g * xg[m, g], xg the group sums of the rounded x (the caller's,
   once per call) */
ALWAYS void row_int4(const int M, int64_t n, int64_t K, int64_t G, const int8_t *xq, const float *dx,
                     const float *xg, const uint8_t *q, const _Float16 *d, const _Float16 *mins,
                     float *y, int64_t ldy) {
    const int64_t nb = K / 32, groups = K / G;
    const int sh = group_shift(K, G);
    F8 acc[M], acc2[M];
    for (int m = 0; m < M; m++) acc[m] = acc2[m] = f8_zero();
    const _Float16 *dr = d + n * groups;
    const uint8_t *qr = q + n * (K / 2);
#define LOAD4(b) q4_load(qr + 16 * (b))
    BLOCK_LOOP(LOAD4, dot_us)
    const _Float16 *mr = mins + n * groups;
    for (int m = 0; m < M; m++) {
        float extra = 0.0f;
        for (int64_t g = 0; g < groups; g++) extra += (float)mr[g] * xg[m * groups + g];
        y[m * ldy + n] = f8_sum(acc[m]) + f8_sum(acc2[m]) + extra;
    }
}

/* bf16 weights; io_bf16: x and y are bf16 too (a bf16 model's activations), widened once per call
   and y rounded as torch's .to(bfloat16) rounds: the same numbers as casting around the fp32 call,
   without the two tensor casts per product. */
void gemv_bf16(int M, int64_t N, int64_t K, const void *x, const uint16_t *w, void *y,
               int64_t ldy, int io_bf16, int threads) {
    if (M < 1 || M > MAX_ROWS) return;
    const float *xf = x;
    float *yf = y, *xbuf = 0, *ybuf = 0;
    if (io_bf16) {
        xbuf = malloc(M * K * sizeof(float)), ybuf = malloc(M * ldy * sizeof(float));
        for (int64_t i = 0; i < M * K; i++) xbuf[i] = bf16_f32(((const uint16_t *)x)[i]);
        xf = xbuf, yf = ybuf;
    }
    DISPATCH(row_bf16, K, xf, w, yf, ldy)
    if (io_bf16) {
        for (int m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) ((uint16_t *)y)[m * ldy + n] = f32_bf16(ybuf[m * ldy + n]);
        free(xbuf), free(ybuf);
    }
}

void gemv_f32(int M, int64_t N, int64_t K, const float *x, const float *w, float *y,
              int64_t ldy, int threads) {
    if (M < 1 || M > MAX_ROWS) return;
    DISPATCH(row_f32, K, x, w, y, ldy)
}

void gemv_int8_fx(int M, int64_t N, int64_t K, int64_t G, const float *x, const int8_t *q,
                  const _Float16 *d, float *y, int64_t ldy, int threads) {
    if (M < 1 || M > MAX_ROWS) return;
    DISPATCH(row_int8_fx, K, G, x, q, d, y, ldy)
}

void gemv_int4_fx(int M, int64_t N, int64_t K, int64_t G, const float *x, const float *xsum,
                  const uint8_t *q, const _Float16 *d, const _Float16 *mins, float *y, int64_t ldy,
                  int threads) {
    if (M < 1 || M > MAX_ROWS) return;
    DISPATCH(row_int4_fx, K, G, x, xsum, q, d, mins, y, ldy)
}

void gemv_int8(int M, int64_t N, int64_t K, int64_t G, const float *x, const int8_t *q,
               const _Float16 *d, float *y, int64_t ldy, int threads) {
    if (M < 1 || M > MAX_ROWS) return;
    int8_t *xq = malloc(M * K);
    float *dx = malloc(2 * M * K / 32 * sizeof(float));
    quantize_x(M, K, x, xq, dx, dx + M * K / 32);
    DISPATCH(row_int8, K, G, xq, dx, q, d, y, ldy)
    free(xq), free(dx);
}

void gemv_int4(int M, int64_t N, int64_t K, int64_t G, const float *x, const uint8_t *q,
               const _Float16 *d, const _Float16 *mins, float *y, int64_t ldy, int threads) {
    if (M < 1 || M > MAX_ROWS) return;
    int8_t *xq = malloc(M * K);
    float *dx = malloc(2 * M * K / 32 * sizeof(float)), *xs = dx + M * K / 32;
    quantize_x(M, K, x, xq, dx, xs);
    for (int64_t i = 0; i < M * K / G; i++) {      /* block sums -> group sums, in place */
        float t = 0.0f;
        for (int64_t b = 0; b < G / 32; b++) t += xs[i * (G / 32) + b];
        xs[i] = t;
    }
    DISPATCH(row_int4, K, G, xq, dx, xs, q, d, mins, y, ldy)
    free(xq), free(dx);
}

/* Whole weights back to floats, for many rows: a prefill multiplies the dequantized weight with
   BLAS/oneDNN (AMX for bf16), compute-bound there, instead of these loops. out (N, K): fp32 when
   out_f32, else bf16. */

static inline void put(void *out, int out_f32, int64_t i, float v) {
    if (out_f32) ((float *)out)[i] = v;
    else ((uint16_t *)out)[i] = f32_bf16(v);
}

void dequant_int8(int64_t N, int64_t K, int64_t G, const int8_t *q, const _Float16 *d, void *out,
                  int out_f32, int threads) {
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < K / G; g++) {                 /* a group: one scale, no division */
            const float scale = (float)d[n * (K / G) + g];
            for (int64_t k = g * G; k < (g + 1) * G; k++) put(out, out_f32, n * K + k, scale * (float)q[n * K + k]);
        }
}

void dequant_int4(int64_t N, int64_t K, int64_t G, const uint8_t *q, const _Float16 *d,
                  const _Float16 *mins, void *out, int out_f32, int threads) {
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < K / G; g++) {
            const float scale = (float)d[n * (K / G) + g], min = (float)mins[n * (K / G) + g];
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
                const uint8_t *b = q + n * (K / 2) + k / 2;
                for (int j = 0; j < 16; j++) {
                    put(out, out_f32, n * K + k + j, scale * (float)(b[j] & 15) + min);
                    put(out, out_f32, n * K + k + j + 16, scale * (float)(b[j] >> 4) + min);
                }
            }
        }
}

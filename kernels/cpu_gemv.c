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
   x and y are fp32 (or bf16 with bf16 weights). The torch references are in cpu_gemv.py.

   Every product is gemv_prepare (what x needs once: its int8 rounding, group sums, a bf16 copy)
   then gemv_range over a range of weight rows, so the one-call decode step (cpu_step.c) runs them
   inside its own parallel region; the exported gemv_* functions below do both for one product. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_common.h"

#define MAX_ROWS 8   /* rows of x per pass over the weights: 8 x 32 fp32 lanes fit the registers */

/* Each kernel is a row body, `static inline` over a constant M: gemv_range calls it with M =
   1..8 spelled out, so the compiler unrolls the loops over rows of x and keeps acc[m][0..31] in
   vector registers. A row body leaves its M sums in r[]; gemv_range stores them (OUT_* modes).
   Threads split the weight rows; each row's lanes are summed once, at its end. */
#define ALWAYS static inline __attribute__((always_inline))

/* Each weight stream asks for the line AHEAD bytes on, into L2. The hardware prefetchers stop
   at every 4 KiB page boundary and ramp up again on the next page; a bf16 row of 576 values is
   1152 bytes, too short a stream for them to ramp up at all. Asked ~16 KiB ahead (several rows
   on), the lines arrive on time: SmolLM2's bf16 products at one row read ~25% faster here,
   fp32 ~8% (interleaved microbenchmark, 2 threads, weights in 2 MiB pages or in a file's
   4 KiB ones alike). A prefetch never faults, so the last rows may ask past the weight's end. */
#define AHEAD 16384
ALWAYS void ahead(const void *p) { __builtin_prefetch((const char *)p + AHEAD, 0, 2); }

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
ALWAYS void v_store(float *p, V a) { _mm512_storeu_ps(p, a); }
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
ALWAYS void v_store(float *p, V a) { _mm256_storeu_ps(p, a.a), _mm256_storeu_ps(p + 8, a.b); }
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
ALWAYS void v_store(float *p, V a) { memcpy(p, a.f, 64); }
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

ALWAYS void sums(const int M, V acc[][2], float *r) {
    for (int m = 0; m < M; m++) r[m] = v_sum(v_add(acc[m][0], acc[m][1]));
}

#define ZERO(acc) for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = v_zero()

ALWAYS void row_bf16(const int M, int64_t n, const Weight *w, const Input *in, float *r) {
    const int64_t K = w->K;
    V acc[M][2];
    ZERO(acc);
    const uint16_t *wr = (const uint16_t *)w->q + n * K;
    for (int64_t k = 0; k < K; k += 32) ahead(wr + k), block(M, acc, in->x, K, k, v_bf16(wr + k), v_bf16(wr + k + 16));
    sums(M, acc, r);
}

/* AVX512-BF16: x (a bf16 model's activations: bf16 values) as bf16 too, and each pair of
   products summed by one vdpbf16ps: a third of the instructions per weight of widening it to fp32,
   so the loop reads at the memory's pace instead of the core's. The products are exact; the sums
   are fp32, in another order. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_DPBF16 1
ALWAYS __m512bh bh_load(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }
ALWAYS void row_bf16_dp(const int M, int64_t n, const Weight *w, const Input *in, float *r) {
    const int64_t K = w->K;
    __m512 acc[M][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    const uint16_t *wr = (const uint16_t *)w->q + n * K, *x = in->xb;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {                       /* two chains of 32 weights */
        ahead(wr + k), ahead(wr + k + 32);
        const __m512bh w0 = bh_load(wr + k), w1 = bh_load(wr + k + 32);
        for (int m = 0; m < M; m++) {
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], bh_load(x + m * K + k), w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], bh_load(x + m * K + k + 32), w1);
        }
    }
    if (k < K) {                                         /* K % 64 == 32 */
        const __m512bh w0 = bh_load(wr + k);
        for (int m = 0; m < M; m++) acc[m][0] = _mm512_dpbf16_ps(acc[m][0], bh_load(x + m * K + k), w0);
    }
    for (int m = 0; m < M; m++) r[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}
#endif

#ifdef HAVE_DPBF16
/* bf16 (x bf16 too), one row of x: 4 weight rows at once, x's 32 values loaded once for the four
   (~4% faster than row by row once both prefetch; the same products, one chain per row) */
static void rows4_bf16_dp(int64_t n, const Weight *w, const Input *in, float *r) {
    const int64_t K = w->K;
    const uint16_t *w0 = (const uint16_t *)w->q + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K, *x = in->xb;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
        ahead(w0 + k), ahead(w1 + k), ahead(w2 + k), ahead(w3 + k);
        const __m512bh xv = bh_load(x + k);
        a0 = _mm512_dpbf16_ps(a0, xv, bh_load(w0 + k)), a1 = _mm512_dpbf16_ps(a1, xv, bh_load(w1 + k));
        a2 = _mm512_dpbf16_ps(a2, xv, bh_load(w2 + k)), a3 = _mm512_dpbf16_ps(a3, xv, bh_load(w3 + k));
    }
    r[0] = _mm512_reduce_add_ps(a0), r[1] = _mm512_reduce_add_ps(a1);
    r[2] = _mm512_reduce_add_ps(a2), r[3] = _mm512_reduce_add_ps(a3);
}
#endif

/* fp32, one row of x: 4 weight rows at once, four streams for the hardware prefetchers instead of
   one and x read once for four rows: ~20% faster than row by row here, and than MKL's gemv (for
   bf16's dot products, above, ~4%: what they wanted was the prefetch, ahead). */
static void rows4_f32(int64_t n, const Weight *w, const float *x, float *r) {
    const int64_t K = w->K;
    const float *w0 = (const float *)w->q + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    V a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();
    for (int64_t k = 0; k < K; k += 16) {
        const V xv = v_load(x + k);
        ahead(w0 + k), ahead(w1 + k), ahead(w2 + k), ahead(w3 + k);
        a0 = v_fma(xv, v_load(w0 + k), a0), a1 = v_fma(xv, v_load(w1 + k), a1);
        a2 = v_fma(xv, v_load(w2 + k), a2), a3 = v_fma(xv, v_load(w3 + k), a3);
    }
    r[0] = v_sum(a0), r[1] = v_sum(a1), r[2] = v_sum(a2), r[3] = v_sum(a3);
}

ALWAYS void row_f32(const int M, int64_t n, const Weight *w, const Input *in, float *r) {
    const int64_t K = w->K;
    V acc[M][2];
    ZERO(acc);
    const float *wr = (const float *)w->q + n * K;
    for (int64_t k = 0; k < K; k += 32) {
        ahead(wr + k), ahead(wr + k + 16);
        block(M, acc, in->x, K, k, v_load(wr + k), v_load(wr + k + 16));
    }
    sums(M, acc, r);
}

/* int8 and int4 weights with fp32 activations ("exact": the product of x with the dequantized
   weight, to fp32 rounding; what an as-stored GGUF file runs, so that it equals transformers'
   reading of the file). The weights are widened to fp32 in registers; compute-bound, ~1.4x slower
   than the integer products below. int4: sum_k x_k (q_k d + m) = d sum_k x_k q_k + m sum_k x_k,
   the group sums of x (in->xs, (M, K/G)) made once per product by gemv_prepare. */
ALWAYS void row_int8_fx(const int M, int64_t n, const Weight *w, const Input *in, float *r) {
    const int64_t K = w->K, G = w->G;
    V acc[M][2];
    ZERO(acc);
    const int8_t *qr = (const int8_t *)w->q + n * K;
    const _Float16 *dr = w->d + n * (K / G);
    for (int64_t g = 0; g < K / G; g++) {                    /* a group: one scale */
        V scale = v_set((float)dr[g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32)
            block(M, acc, in->x, K, k, v_mul(scale, v_int8(qr + k)), v_mul(scale, v_int8(qr + k + 16)));
    }
    sums(M, acc, r);
}

ALWAYS void row_int4_fx(const int M, int64_t n, const Weight *w, const Input *in, float *r) {
    const int64_t K = w->K, G = w->G, groups = K / G;
    V acc[M][2];
    ZERO(acc);
    const uint8_t *qr = (const uint8_t *)w->q + n * (K / 2);
    const _Float16 *dr = w->d + n * groups, *mr = w->m + n * groups;
    for (int64_t g = 0; g < groups; g++) {
        V scale = v_set((float)dr[g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
            const uint8_t *b = qr + k / 2;
            block(M, acc, in->x, K, k, v_mul(scale, v_nibbles(b, 0)), v_mul(scale, v_nibbles(b, 1)));
        }
    }
    sums(M, acc, r);
    for (int m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) r[m] += (float)mr[g] * in->xs[m * groups + g];
}

/* -- int8 and int4 weights: integer dot products, as llama.cpp's Q8_0 x Q4_0 / Q4_1 --------------
   Widening every weight to fp32 costs more than reading it: these products are compute-bound in
   fp32 (int4 ~10 G weights/s per core here). So x is quantized too, once per product, to int8 in
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

ALWAYS void row_int8(const int M, int64_t n, const Weight *w, const Input *in, float *r) {
    const int64_t K = w->K, nb = K / 32;
    const int sh = group_shift(K, w->G);
    const int8_t *xq = in->xq;
    const float *dx = in->dx;
    F8 acc[M], acc2[M];
    for (int m = 0; m < M; m++) acc[m] = acc2[m] = f8_zero();
    const _Float16 *dr = w->d + n * (K / w->G);
    const int8_t *qr = (const int8_t *)w->q + n * K;
#define LOAD8(b) (ahead(qr + 32 * (b)), i8_load(qr + 32 * (b)))
    BLOCK_LOOP(LOAD8, dot_ss)
    for (int m = 0; m < M; m++) r[m] = f8_sum(acc[m]) + f8_sum(acc2[m]);
}

/* int4's m term: sum_groups m_g * xs[m, g], xs the group sums of the rounded x */
ALWAYS void row_int4(const int M, int64_t n, const Weight *w, const Input *in, float *r) {
    const int64_t K = w->K, nb = K / 32, groups = K / w->G;
    const int sh = group_shift(K, w->G);
    const int8_t *xq = in->xq;
    const float *dx = in->dx;
    F8 acc[M], acc2[M];
    for (int m = 0; m < M; m++) acc[m] = acc2[m] = f8_zero();
    const _Float16 *dr = w->d + n * groups, *mr = w->m + n * groups;
    const uint8_t *qr = (const uint8_t *)w->q + n * (K / 2);
#define LOAD4(b) (ahead(qr + 16 * (b)), q4_load(qr + 16 * (b)))
    BLOCK_LOOP(LOAD4, dot_us)
    for (int m = 0; m < M; m++) {
        float extra = 0.0f;
        for (int64_t g = 0; g < groups; g++) extra += (float)mr[g] * in->xs[m * groups + g];
        r[m] = f8_sum(acc[m]) + f8_sum(acc2[m]) + extra;
    }
}

/* -- the same integer products, two blocks per AVX-512 register -----------------------------
   With AVX512-VNNI one vpdpbusd takes 64 weights: two blocks side by side, 8 int32 lanes each.
   The blocks' scales d[n, b] dx[m, b] come 16 blocks at a time (one fp16 load, one fp32 load,
   one multiply) and are spread over the lanes by one vpermps per pair. An int4 pair is 32 bytes,
   read as [b's low nibbles, b+1's low | b's high, b+1's high], so gemv_prepare stores x's pairs of
   blocks in that order too (pair_order); a last odd block keeps the natural order and takes the
   256-bit loop. int4's m term is one FMA per 16 groups. ~2.5x fewer instructions per weight. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_VNNI512 1
static void pair_order(int M, int64_t K, int8_t *xq) {   /* swap the middle 16 bytes of each pair */
    for (int m = 0; m < M; m++)
        for (int64_t b = 0; b + 1 < K / 32; b += 2) {
            int8_t t[16], *p = xq + m * K + 32 * b;
            memcpy(t, p + 16, 16), memcpy(p + 16, p + 32, 16), memcpy(p + 32, t, 16);
        }
}

ALWAYS __m512 f16x16(const _Float16 *p, int count) {   /* count <= 16 fp16 -> fp32 lanes, 0 past */
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), p));
}
ALWAYS __m512 f32x16(const float *p, int count) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), p);
}
/* d of blocks b0 .. b0 + 15 of row dr (groups of 2^sh blocks; sh 62: one per row) */
ALWAYS __m512 block_d(const _Float16 *dr, int64_t b0, int sh, int count) {
    if (sh == 62) return _mm512_set1_ps((float)dr[0]);
    const __m512 g = f16x16(dr + (b0 >> sh), ((count - 1) >> sh) + 1);
    return sh ? _mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), sh), g) : g;
}
/* lane l of pair j: block 2j + which (int8: l / 8; int4: (l / 4) & 1) */
ALWAYS __m512i pair_lanes(int j, int int4) {
    const __m512i l = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i which = int4 ? _mm512_and_si512(_mm512_srli_epi32(l, 2), _mm512_set1_epi32(1)) : _mm512_srli_epi32(l, 3);
    return _mm512_add_epi32(which, _mm512_set1_epi32(2 * j));
}
ALWAYS __m512i q4_pair(const uint8_t *p) {
    const __m256i r = _mm256_loadu_si256((const __m256i *)p);
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(r), _mm256_srli_epi16(r, 4), 1);
    return _mm512_and_si512(v, _mm512_set1_epi8(15));
}
/* one pair (blocks b, b + 1) into acc[m]: int4 (w unsigned) or int8 (|w|, x given w's sign) */
#define PAIR(ACC, j)                                                                        \
    {                                                                                       \
        const int64_t b = b0 + 2 * (j);                                                     \
        ahead(int4 ? (const void *)(q4 + 16 * b) : (const void *)(q8 + 32 * b));            \
        __m512i wv = int4 ? q4_pair(q4 + 16 * b) : _mm512_loadu_si512(q8 + 32 * b);          \
        const __mmask64 neg = int4 ? 0 : _mm512_movepi8_mask(wv);                           \
        if (!int4) wv = _mm512_abs_epi8(wv);                                                \
        const __m512i lanes = pair_lanes(j, int4);                                          \
        for (int m = 0; m < M; m++) {                                                       \
            __m512i xv = _mm512_loadu_si512(in->xq + m * K + 32 * b);                       \
            if (!int4) xv = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);      \
            const __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv)); \
            ACC[m] = _mm512_fmadd_ps(p, _mm512_permutexvar_ps(lanes, s[m]), ACC[m]);         \
        }                                                                                   \
    }

/* the odd last block of a row (natural order) against row m of x, as the 256-bit loop does it */
ALWAYS float odd_block(const Weight *w, int64_t n, const Input *in, int m, const int int4) {
    const int64_t K = w->K, b = K / 32 - 1;
    const I8x32 wv = int4 ? q4_load((const uint8_t *)w->q + n * (K / 2) + 16 * b) : i8_load((const int8_t *)w->q + n * K + 32 * b);
    const I8x32 xv = i8_load(in->xq + m * K + 32 * b);
    const float scale = (float)w->d[n * (K / w->G) + (b >> group_shift(K, w->G))] * in->dx[m * (K / 32) + b];
    return f8_sum(f8_fma(int4 ? dot_us(wv, xv) : dot_ss(wv, xv), scale, f8_zero()));
}
/* int4's m term of row n against row m of x, sum_g m[n, g] xs[m, g], into acc (16 groups an FMA) */
ALWAYS __m512 min_term(const Weight *w, int64_t n, const Input *in, int m, __m512 acc) {
    const int64_t groups = w->K / w->G;
    const _Float16 *mr = w->m + n * groups;
    for (int64_t g = 0; g < groups; g += 16) {
        const int c = groups - g < 16 ? (int)(groups - g) : 16;
        acc = _mm512_fmadd_ps(f16x16(mr + g, c), f32x16(in->xs + m * groups + g, c), acc);
    }
    return acc;
}

ALWAYS void row_int_512(const int M, int64_t n, const Weight *w, const Input *in, float *r, const int int4) {
    const int64_t K = w->K, nb = K / 32, groups = K / w->G;
    const int sh = group_shift(K, w->G);
    const _Float16 *dr = w->d + n * groups;
    const uint8_t *q4 = (const uint8_t *)w->q + n * (K / 2);
    const int8_t *q8 = (const int8_t *)w->q + n * K;
    __m512 acc[M], acc2[M], s[M];
    for (int m = 0; m < M; m++) acc[m] = acc2[m] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int count = nb - b0 < 16 ? (int)(nb - b0) : 16, pairs = count / 2;
        const __m512 d = block_d(dr, b0, sh, count);
        for (int m = 0; m < M; m++) s[m] = _mm512_mul_ps(d, f32x16(in->dx + m * nb + b0, count));
        int j = 0;
        for (; j + 1 < pairs; j += 2) { PAIR(acc, j) PAIR(acc2, j + 1) }
        if (j < pairs) PAIR(acc, j)
    }
    for (int m = 0; m < M; m++) {
        r[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], acc2[m]));
        if (nb & 1) r[m] += odd_block(w, n, in, m, int4);
        if (int4) r[m] += _mm512_reduce_add_ps(min_term(w, n, in, m, _mm512_setzero_ps()));
    }
}
/* One row of x against 4 weight rows (int8 or int4, round_x), for decode at batch 1: x's blocks
   are loaded once for 4 rows and 4 independent chains keep the VNNI unit busy; the sums are the
   row-by-row loop's, in the same block order (one accumulator per row instead of two). */
ALWAYS void rows4_int_512(int64_t n, const Weight *w, const Input *in, float *r, const int int4) {
    const int64_t K = w->K, nb = K / 32, groups = K / w->G;
    const int sh = group_shift(K, w->G);
    __m512 acc[4], s[4];
    for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int count = nb - b0 < 16 ? (int)(nb - b0) : 16, pairs = count / 2;
        const __m512 dxv = f32x16(in->dx + b0, count);
        for (int i = 0; i < 4; i++) s[i] = _mm512_mul_ps(block_d(w->d + (n + i) * groups, b0, sh, count), dxv);
        for (int j = 0; j < pairs; j++) {
            const int64_t b = b0 + 2 * j;
            const __m512i xv = _mm512_loadu_si512(in->xq + 32 * b), lanes = pair_lanes(j, int4);
            for (int i = 0; i < 4; i++) {
                __m512i wv, xs = xv;
                if (int4) {
                    const uint8_t *q = (const uint8_t *)w->q + (n + i) * (K / 2) + 16 * b;
                    if (!(j & 1)) ahead(q);                     /* a line holds two pairs */
                    wv = q4_pair(q);
                } else {
                    const int8_t *q = (const int8_t *)w->q + (n + i) * K + 32 * b;
                    ahead(q);
                    wv = _mm512_loadu_si512(q);
                    xs = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), xv);
                    wv = _mm512_abs_epi8(wv);
                }
                const __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xs));
                acc[i] = _mm512_fmadd_ps(p, _mm512_permutexvar_ps(lanes, s[i]), acc[i]);
            }
        }
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_reduce_add_ps(int4 ? min_term(w, n + i, in, 0, acc[i]) : acc[i]);
        if (nb & 1) r[i] += odd_block(w, n + i, in, 0, int4);
    }
}

ALWAYS void row_int8_512(const int M, int64_t n, const Weight *w, const Input *in, float *r) { row_int_512(M, n, w, in, r, 0); }
ALWAYS void row_int4_512(const int M, int64_t n, const Weight *w, const Input *in, float *r) { row_int_512(M, n, w, in, r, 1); }
#endif

/* What a product needs of x before its rows: the rounded x and its group sums (round_x), int4's
   group sums of the fp32 x, or bf16 weights' x as bf16. in->xq, dx, xs, xb point at buffers of
   M K bytes, M K / 32 floats (each) and M K uint16 (cpu_common.h). */
void gemv_prepare(const Weight *w, Input *in) {
    const int64_t K = w->K, G = w->G, R = in->M * K / G;
    if (w->kind == W_BF16) {
        uint16_t *xb = in->xb;
        in->xb = 0;
#ifdef HAVE_DPBF16
        for (int64_t i = 0; i < in->M * K; i++) {       /* only if every value is a bf16 */
            uint32_t u;
            memcpy(&u, in->x + i, 4);
            if (u & 0xffff) return;
            xb[i] = (uint16_t)(u >> 16);
        }
        in->xb = xb;
#endif
        (void)xb;
        return;
    }
    if (w->kind != W_INT8 && w->kind != W_INT4) return;
    if (w->round_x) {
        quantize_x(in->M, K, in->x, in->xq, in->dx, in->xs);
#ifdef HAVE_VNNI512
        if (w->kind == W_INT4) pair_order(in->M, K, in->xq);
#endif
        if (w->kind == W_INT4)                         /* block sums -> group sums, in place */
            for (int64_t i = 0; i < R; i++) {
                float t = 0.0f;
                for (int64_t b = 0; b < G / 32; b++) t += in->xs[i * (G / 32) + b];
                in->xs[i] = t;
            }
    } else if (w->kind == W_INT4) {
        for (int64_t i = 0; i < R; i++) {
            float t = 0.0f;
            for (int64_t k = 0; k < G; k++) t += in->x[i * G + k];
            in->xs[i] = t;
        }
    }
}

/* Rows n0..n1-1 of y (M, ldy) = x @ w.T, under `mode` (OUT_ADD, OUT_BF16). More than 8 rows of x:
   in chunks of 8, each a pass over the weights. */
#define ROWS(ROW)                                                                           \
    for (int64_t n = n0; n < n1; n++) {                                                     \
        switch (M) {                                                                        \
        case 1: ROW(1, n, w, &c, r); break;                                                 \
        case 2: ROW(2, n, w, &c, r); break;                                                 \
        case 3: ROW(3, n, w, &c, r); break;                                                 \
        case 4: ROW(4, n, w, &c, r); break;                                                 \
        case 5: ROW(5, n, w, &c, r); break;                                                 \
        case 6: ROW(6, n, w, &c, r); break;                                                 \
        case 7: ROW(7, n, w, &c, r); break;                                                 \
        default: ROW(8, n, w, &c, r); break;                                                \
        }                                                                                   \
        for (int m = 0; m < M; m++) store(yc + m * ldy + n, r[m], mode);                    \
    }

static inline void store(float *out, float v, int mode) {   /* a result under OUT_* */
    if (mode & OUT_BF16) v = round_bf16(v);
    if (mode & OUT_ADD) v = mode & OUT_BF16 ? round_bf16(*out + v) : *out + v;
    *out = v;
}

/* One row of x, 4 weight rows a pass (CALL fills r[0..3] for rows n0..n0+3); ROWS takes the rest */
#define ROWS4(CALL)                                                                             for (; n0 + 4 <= n1; n0 += 4) {                                                                 CALL;                                                                                       for (int j = 0; j < 4; j++) store(yc + n0 + j, r[j], mode);                             }

void gemv_range(const Weight *w, const Input *in, float *y, int64_t ldy, int64_t first, int64_t n1, int mode) {
    const int64_t K = w->K, G = w->G;
    for (int m0 = 0; m0 < in->M; m0 += MAX_ROWS) {
        const int M = in->M - m0 < MAX_ROWS ? in->M - m0 : MAX_ROWS;
        const Input c = {M, in->x + m0 * K, in->xq ? in->xq + m0 * K : 0, in->dx ? in->dx + m0 * K / 32 : 0,
                         in->xs ? in->xs + m0 * K / G : 0, in->xb ? in->xb + m0 * K : 0};
        float r[MAX_ROWS], *yc = y + m0 * ldy;
        int64_t n0 = first;
        if (M == 1 && w->kind == W_F32) ROWS4(rows4_f32(n0, w, c.x, r))
#ifdef HAVE_DPBF16
        if (M == 1 && w->kind == W_BF16 && c.xb) ROWS4(rows4_bf16_dp(n0, w, &c, r))
#endif
#ifdef HAVE_VNNI512
        if (M == 1 && (w->kind == W_INT8 || w->kind == W_INT4) && w->round_x)
            ROWS4(rows4_int_512(n0, w, &c, r, w->kind == W_INT4))
#endif
        switch (w->kind) {
        case W_F32: ROWS(row_f32) break;
        case W_BF16:
#ifdef HAVE_DPBF16
            if (c.xb) { ROWS(row_bf16_dp) break; }
#endif
            ROWS(row_bf16) break;
#ifdef HAVE_VNNI512
        case W_INT8: if (w->round_x) { ROWS(row_int8_512) } else { ROWS(row_int8_fx) } break;
        case W_INT4: if (w->round_x) { ROWS(row_int4_512) } else { ROWS(row_int4_fx) } break;
#else
        case W_INT8: if (w->round_x) { ROWS(row_int8) } else { ROWS(row_int8_fx) } break;
        case W_INT4: if (w->round_x) { ROWS(row_int4) } else { ROWS(row_int4_fx) } break;
#endif
        }
    }
}

/* One product on its own: prepare, then the threads split the weight's rows. */
static void gemv(const Weight *w, int M, const float *x, float *y, int64_t ldy, int mode, int threads) {
    int8_t *xq = malloc(M * w->K);
    float *dx = malloc(2 * M * w->K / 32 * sizeof(float));
    uint16_t *xb = malloc(M * w->K * 2);
    Input in = {M, x, xq, dx, dx + M * w->K / 32, xb};
    gemv_prepare(w, &in);
    _Pragma("omp parallel num_threads(threads)")
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        gemv_range(w, &in, y, ldy, split(w->N, t, T), split(w->N, t + 1, T), mode);
    }
    free(xq), free(dx), free(xb);
}

/* bf16 weights; io_bf16: x and y are bf16 too (a bf16 model's activations), widened once per call
   and y rounded as torch's .to(bfloat16) rounds: the same numbers as casting around the fp32 call,
   without the two tensor casts per product. */
void gemv_bf16(int M, int64_t N, int64_t K, const void *x, const uint16_t *w, void *y,
               int64_t ldy, int io_bf16, int threads) {
    const Weight wt = {W_BF16, 0, N, K, K, w, 0, 0};
    if (!io_bf16) {
        gemv(&wt, M, x, y, ldy, 0, threads);
        return;
    }
    float *xf = malloc(M * K * sizeof(float)), *yf = malloc(M * ldy * sizeof(float));
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_f32(((const uint16_t *)x)[i]);
    gemv(&wt, M, xf, yf, ldy, 0, threads);
    for (int m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) ((uint16_t *)y)[m * ldy + n] = f32_bf16(yf[m * ldy + n]);
    free(xf), free(yf);
}

void gemv_f32(int M, int64_t N, int64_t K, const float *x, const float *w, float *y, int64_t ldy, int threads) {
    const Weight wt = {W_F32, 0, N, K, K, w, 0, 0};
    gemv(&wt, M, x, y, ldy, 0, threads);
}

void gemv_int8(int M, int64_t N, int64_t K, int64_t G, const float *x, const int8_t *q, const _Float16 *d,
               float *y, int64_t ldy, int round_x, int threads) {
    const Weight wt = {W_INT8, round_x, N, K, G, q, d, 0};
    gemv(&wt, M, x, y, ldy, 0, threads);
}

void gemv_int4(int M, int64_t N, int64_t K, int64_t G, const float *x, const uint8_t *q, const _Float16 *d,
               const _Float16 *mins, float *y, int64_t ldy, int round_x, int threads) {
    const Weight wt = {W_INT4, round_x, N, K, G, q, d, mins};
    gemv(&wt, M, x, y, ldy, 0, threads);
}

/* Whole weights back to floats, for many rows: a prefill multiplies the dequantized weight with
   BLAS/oneDNN (AMX for bf16), compute-bound there, instead of these loops. out (N, K): fp32 when
   out_f32, else bf16. */

/* 16 values into out at i: fp32, or bf16 rounded as torch rounds (the weight's values, computed as
   the references compute them: q d, then + m, two roundings) */
ALWAYS void put16(void *out, int out_f32, int64_t i, V v) {
    if (out_f32) {
        v_store((float *)out + i, v);
        return;
    }
    float t[16];
    v_store(t, v);
    for (int j = 0; j < 16; j++) ((uint16_t *)out)[i + j] = f32_bf16(t[j]);
}

void dequant_int8(int64_t N, int64_t K, int64_t G, const int8_t *q, const _Float16 *d, void *out,
                  int out_f32, int threads) {
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < K / G; g++) {                 /* a group: one scale, no division */
            const V scale = v_set((float)d[n * (K / G) + g]);
            for (int64_t k = g * G; k < (g + 1) * G; k += 16) put16(out, out_f32, n * K + k, v_mul(scale, v_int8(q + n * K + k)));
        }
}

void dequant_int4(int64_t N, int64_t K, int64_t G, const uint8_t *q, const _Float16 *d,
                  const _Float16 *mins, void *out, int out_f32, int threads) {
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < K / G; g++) {
            const V scale = v_set((float)d[n * (K / G) + g]), min = v_set((float)mins[n * (K / G) + g]);
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
                const uint8_t *b = q + n * (K / 2) + k / 2;
                put16(out, out_f32, n * K + k, v_add(v_mul(scale, v_nibbles(b, 0)), min));
                put16(out, out_f32, n * K + k + 16, v_add(v_mul(scale, v_nibbles(b, 1)), min));
            }
        }
}

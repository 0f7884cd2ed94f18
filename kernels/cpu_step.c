/* A whole decode step of a Llama-style decoder in one call: every layer's RMSNorm, products,
   q/k norms and rotary, cache write, attention, SiLU gate and residual adds, then the final norm
   and the head, inside one OpenMP parallel region.

   Why: at batch 1 a small model's token is ~10 products and ~10 small steps per layer. Called
   one by one from Python each costs ~5-10 us of dispatch and an OpenMP fork and join (SmolLM2-135M:
   ~7 ms of ~19 ms per token at 2 threads); here the threads meet at a barrier (~1 us) between
   steps. The steps are the same functions the eager path calls (gemv_range, qkv_store,
   attend_head, rmsnorm) and round where it rounds, so this computes what the eager decoder
   computes: the reference is minillm's Decoder itself (minillm/decode_step.py builds the
   description below from it; the tests compare the two).

   Activations are fp32 arrays. A bf16 model's hold bf16 values: rounded (OUT_BF16) where torch
   rounds its bf16 tensors: each product's output, each residual add, the norm (normalised in
   fp32, rounded, times the weight, rounded, as transformers), silu(gate) and its product. */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_common.h"

typedef struct {
    Weight qkv, o, gate_up, down;                     /* q|k|v fused, gate|up fused */
    const float *attn_norm, *mlp_norm, *q_norm, *k_norm;   /* fp32 (of a bf16 model: its values); q/k: NULL or (D,) */
} Layer;

typedef struct {
    int layers, H, Hkv, D, C, I, bf16, kv_bf16;       /* bf16: the activations are bf16 */
    float eps, scale;
    const Layer *layer;
    const float *norm;                                /* the final norm */
    Weight head;
} Model;

typedef struct { int8_t *xq; float *dx, *xs; uint16_t *xb; } Buffers;   /* one thread's (Input) */

static Buffers buffers(int M, int64_t K) {
    Buffers b = {malloc(M * K), malloc(2 * M * K / 32 * sizeof(float)), 0, malloc(M * K * 2)};
    b.xs = b.dx + M * K / 32;
    return b;
}

/* y = x @ w.T for M rows (mode OUT_*): every thread prepares x (rounding, group sums) in its own
   buffers, the same numbers each, rather than one thread while the others wait at two barriers;
   then each computes its share of the weight's rows, and all meet at one barrier. */
static void product(const Weight *w, int M, const float *x, float *y, int64_t ldy, int mode, const Buffers *buf) {
    Input in = {M, x, buf->xq, buf->dx, buf->xs, buf->xb};
    gemv_prepare(w, &in);
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    gemv_range(w, &in, y, ldy, split(w->N, t, T), split(w->N, t + 1, T), mode);
    _Pragma("omp barrier")
}

/* One token for each of M sequences. x (M, C): the embeddings in, the last hidden state out.
   cos, sin (M, D) or NULL; k, v: layer 0's cache (rows, Hkv, D), layer l at + l * kv_stride
   elements; the new tokens go to rows write_rows (M,), sequence b reads rows[b, 0..lens[b]-1]
   (rows (M, S)). logits (M, head.N). */
void decode_step(const Model *md, int M, float *x, const float *cos, const float *sin, void *k, void *v,
                 int64_t kv_stride, const int64_t *write_rows, const int64_t *rows, int64_t S,
                 const int64_t *lens, float *logits, int threads) {
    const int H = md->H, Hkv = md->Hkv, D = md->D, bf16 = md->bf16, mode = bf16 ? OUT_BF16 : 0;
    const int64_t C = md->C, I = md->I, QKV = (int64_t)(H + 2 * Hkv) * D, esize = md->kv_bf16 ? 2 : 4;
    const int64_t K = C > I ? (C > H * D ? C : H * D) : (I > H * D ? I : H * D);   /* widest input */
    float *qkv = malloc(M * (QKV + H * D + 2 * I) * sizeof(float)), *att = qkv + M * QKV, *gu = att + M * H * D;
    _Pragma("omp parallel num_threads(threads)")
    {   /* per thread: the norm's output h and the gate's act (each thread computes them whole: no
           barrier after), x's prepared copies, the attention scores p */
        float *h = malloc(M * (C + I) * sizeof(float)), *act = h + M * C;
        float *p = malloc((S > 0 ? S : 1) * sizeof(float));
        const Buffers buf = buffers(M, K);
        for (int l = 0; l < md->layers; l++) {
            const Layer *L = md->layer + l;
            char *kl = (char *)k + l * kv_stride * esize, *vl = (char *)v + l * kv_stride * esize;
            rmsnorm(M, C, x, L->attn_norm, md->eps, bf16, h);
            product(&L->qkv, M, h, qkv, QKV, mode, &buf);
            _Pragma("omp single")
            qkv_store(M, H, Hkv, D, qkv, L->q_norm, L->k_norm, md->eps, cos, sin, kl, vl, md->kv_bf16, write_rows);
            _Pragma("omp for schedule(static)")
            for (int64_t t = 0; t < (int64_t)M * H; t++) {
                attend_head(t / H, t % H, H, Hkv, D, D, S, qkv, QKV, kl, vl, md->kv_bf16, rows, lens,
                            md->scale, att, p);
                if (bf16)
                    for (int i = 0; i < D; i++) att[t * D + i] = round_bf16(att[t * D + i]);
            }
            product(&L->o, M, att, x, C, mode | OUT_ADD, &buf);             /* x += attn(x) */
            rmsnorm(M, C, x, L->mlp_norm, md->eps, bf16, h);
            product(&L->gate_up, M, h, gu, 2 * I, mode, &buf);
            silu_mul(M, I, gu, bf16, act);
            product(&L->down, M, act, x, C, mode | OUT_ADD, &buf);          /* x += mlp(x) */
        }
        rmsnorm(M, C, x, md->norm, md->eps, bf16, h);
        product(&md->head, M, h, logits, md->head.N, mode, &buf);
        free(h), free(p), free(buf.xq), free(buf.dx), free(buf.xb);
    }
    free(qkv);
}

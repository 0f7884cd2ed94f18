"""CPU decode as one C call per token (kernels/cpu_step.c), for the decoders it covers.

At batch 1 a small model spends as long between its products as in them when each layer is ~20
module calls from Python (SmolLM2-135M, 2 threads: ~7 ms of ~19 ms per token). So when a step
decodes one token per sequence on CPU (Step.cpu_decode), Decoder.forward hands the layers, the
final norm and the head to one `decode_step` call: the same kernels as the eager path, called from
one OpenMP region, rounding where it rounds. The eager path stays the reference; the tests compare
the two on every architecture and dtype this takes.

What it takes (else the eager path runs, and `why_not` says why): RMSNorm, GQA/MHA attention
with full-width rotary (optional q/k norms), the gated SiLU MLP, no biases, fp32 or bf16
activations, and every product one the C loops read: fp32 or bf16 weights stored (out, in), or
quantized ones on the CPU kernels (quant.Packed). Llama, Qwen3 and SmolLM2, not GPT-2, MLA or MoE.
Up to MAX_ROWS sequences at once, as the loops' products (more: the eager path, whose BLAS or
dequantized matmul reads each weight once for all rows). MINILLM_DECODE_STEP=0 turns it off.
"""
from __future__ import annotations

import os

import torch

from .kernels import cpu_step as K
from .kernels.cpu_gemv import f32
from .layers import Linear
from .quant import Packed

MAX_ROWS = K.MAX_ROWS


def why_not(model) -> str | None:
    """None if decode_step takes this Decoder, else the reason."""
    cfg = model.cfg
    if os.environ.get("MINILLM_DECODE_STEP", "1") == "0":
        return "MINILLM_DECODE_STEP=0"
    if cfg.attention == "mla" or cfg.moe_layers:
        return "MLA and MoE layers run eagerly"
    if cfg.norm != "rms" or not cfg.gated_mlp or cfg.act not in ("silu", "swish") or cfg.pos != "rope":
        return "only RMSNorm, rotary and gated SiLU MLPs"
    if cfg.rope_dim != cfg.head_dim:
        return "partial rotary"
    if any(b.mlp.inter != cfg.intermediate_size for b in model.layers):
        return "MLP widths differ between layers"
    if model.dtype not in (torch.float32, torch.bfloat16):
        return f"{model.dtype} activations"
    for name, m in model.named_modules():
        if isinstance(m, (Linear, Packed)):
            if m.bias is not None:
                return f"{name} has a bias"
            if _weight(m) is None:
                return f"{name}: no C loop reads this weight"
    return None


def _weight(m) -> K.Weight | None:
    if isinstance(m, Packed):
        if not m.kernel or m.K % 32:
            return None
        kind = K.W_INT8 if m.scheme.bits == 8 else K.W_INT4
        return K.weight(kind, m.qweight, m.N, m.K, m.K // m.scales.shape[1], m.scales,
                        m.mins if kind == K.W_INT4 else None, m.round_x)
    w = m.weight
    if w.dtype not in (torch.float32, torch.bfloat16) or not w.is_contiguous() or w.shape[1] % 32:
        return None   # e.g. fp32 in the "in_out" layout of the blas-t plan
    return K.weight(K.W_F32 if w.dtype == torch.float32 else K.W_BF16, w, *w.shape)


class DecodeStep:
    """The Decoder's layers, final norm and head as a cpu_step.Model: pointers to its weights
    (which must not move: Decoder drops this when it re-lays or moves them) and fp32 copies of
    its norms."""

    def __init__(self, model):
        cfg = model.cfg
        self.dtype = model.dtype
        f32 = lambda w: None if w is None else w.detach().float().contiguous()   # noqa: E731
        self.keep, layers = [], []
        for block in model.layers:
            a, mlp = block.attn, block.mlp
            norms = [f32(block.attn_norm.weight), f32(block.mlp_norm.weight),
                     f32(a.q_norm.weight) if cfg.qk_norm else None, f32(a.k_norm.weight) if cfg.qk_norm else None]
            self.keep += norms
            layers.append(K.Layer(_weight(a.qkv), _weight(a.o), _weight(mlp.gate_up), _weight(mlp.down),
                                  *map(K.ptr, norms)))
        self.layers = (K.Layer * len(layers))(*layers)
        norm = f32(model.norm.weight)
        self.keep.append(norm)
        self.model = K.Model(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                             cfg.intermediate_size, int(self.dtype == torch.bfloat16), 0, cfg.norm_eps,
                             model.layers[0].attn.scale, self.layers, K.ptr(norm), _weight(model.head))

    def __call__(self, x: torch.Tensor, rope, step) -> torch.Tensor:
        """x (B, T, C) embeddings of one new token per sequence (B * T of them) -> logits (B, T, V)."""
        *lead, C = x.shape
        n = x.numel() // C
        h = x.reshape(n, C).to(torch.float32, copy=True)                   # the C step writes it
        cos, sin = (None, None) if rope is None else (f32(t.reshape(n, -1)) for t in rope)
        k, v, write, read, lens = step.decode_rows(0)
        self.model.kv_bf16 = int(k.dtype == torch.bfloat16)
        logits = torch.empty(n, self.model.head.N)
        K.decode_step(self.model, h, cos, sin, k, v, step.cache.tensors["k"].stride(0), write.contiguous(),
                      read.contiguous(), lens.contiguous(), logits)
        return logits.to(self.dtype).view(*lead, -1)

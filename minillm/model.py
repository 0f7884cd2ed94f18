"""The decoder: embedding -> N x (norm, attention, norm, MLP) -> norm -> head, read from a Config.

Parameter names here are the core names that adapters map checkpoints onto, e.g.
`layers.3.attn.qkv.weight` (q, k and v fused: one GEMM instead of three) and
`layers.3.mlp.gate_up.weight` (gate and up fused).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Step
from .cache import KVCache
from .config import Config
from .cpu import onednn_linear
from .rope import Rotary, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in one call instead of six (bit for bit the same arithmetic)
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # transformers' order: normalise in fp32, cast back, then scale (matters in bf16)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear whose CPU products the loader may hand to oneDNN (Decoder.set_cpu_plan, cpu.py):
    where MKL takes a generic path (AMD), oneDNN's brgemm is up to 2x faster, the same result to
    fp32 rounding. The weight stays an ordinary (out, in) parameter either way."""
    onednn_rows = 0   # oneDNN for inputs of at least this many rows; 0: never

    def forward(self, x):
        if self.onednn_rows and x.numel() >= self.onednn_rows * x.shape[-1] and x.is_cpu:
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def make_norm(cfg: Config, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(dim, eps=cfg.norm_eps)


ACTS = {   # config.ACTIVATIONS
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),   # GPT-2's tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads (MHA when kv_heads == heads)."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sizes = (H * D, Hkv * D, Hkv * D)
        self.qkv = Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.qkv_bias)
        self.o = Linear(H * D, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(D, cfg.norm_eps), RMSNorm(D, cfg.norm_eps)
        self.scale = cfg.attn_scale or 1.0 / math.sqrt(D)

    @staticmethod
    def cache_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
        return {"k": (cfg.num_kv_heads, cfg.head_dim), "v": (cfg.num_kv_heads, cfg.head_dim)}

    def forward(self, x, rope, step: Step):
        B, T, _ = x.shape
        cfg = self.cfg
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = self.qkv(x)
        qk = qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D)  # q heads, then k heads
        v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)        # (B, T, Hkv, D)
        if cfg.qk_norm:                                        # Qwen3: own weights for q and k
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), dim=2)
        if rope is not None:                                   # q and k heads in one rotation
            qk = apply_rope(qk, *rope)
        q, k = qk.split((H, Hkv), dim=2)                       # (B, T, H, D), (B, T, Hkv, D)
        o = step.attend(self.layer, q, k, v, self.scale)       # (B, T, H, D)
        return self.o(o.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config, intermediate: int | None = None):
        super().__init__()
        inter = intermediate or cfg.intermediate_size
        self.gated, self.act, self.inter = cfg.gated_mlp, ACTS[cfg.act], inter
        if self.gated:   # act(gate(x)) * up(x), gate and up in one GEMM
            self.gate_up = Linear(cfg.hidden_size, 2 * inter, bias=cfg.mlp_bias)
        else:
            self.up = Linear(cfg.hidden_size, inter, bias=cfg.mlp_bias)
        self.down = Linear(inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.gated:
            gate, up = self.gate_up(x).split(self.inter, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(self.up(x)))


def make_attention(cfg: Config, layer: int) -> nn.Module:
    if cfg.attention == "mla":
        from .mla import MLAttention
        return MLAttention(cfg, layer)
    return Attention(cfg, layer)


def make_mlp(cfg: Config, layer: int) -> nn.Module:
    if layer in cfg.moe_layers:
        from .moe import MoE
        return MoE(cfg)
    return MLP(cfg)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg, cfg.hidden_size), make_attention(cfg, layer)
        self.mlp_norm, self.mlp = make_norm(cfg, cfg.hidden_size), make_mlp(cfg, layer)

    def forward(self, x, rope, step):
        x = x + self.attn(self.attn_norm(x), rope, step)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.pos == "learned":
            self.pos_embed = nn.Embedding(cfg.max_position, cfg.hidden_size)
        else:
            self.rotary = Rotary(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position,
                                 cfg.rope_interleaved)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.backend = "torch"

    def set_cpu_plan(self, layout: str = "out_in", onednn_rows: int = 0, onednn_min_bytes: int = 2**20):
        """How the Linear layers multiply on CPU (cpu.py measures which way is fastest here).
        layout "in_out" keeps each weight's logical (out, in) shape for F.linear but stores it
        transposed, w.t().contiguous().t(), so BLAS sees its fast x @ W case. Names, shapes and
        values do not change; a tied head keeps the embedding's layout (which is read by rows).
        Free on the meta device, which is where the loader calls it: weights are then allocated
        in their final layout and filled in place. oneDNN (for inputs of >= onednn_rows rows)
        costs ~10 us more per call than BLAS, more than it saves on a weight under 1 MiB."""
        for m in self.modules():
            if not isinstance(m, Linear):
                continue
            w = m.weight
            m.onednn_rows = onednn_rows if w.numel() * w.element_size() >= onednn_min_bytes else 0
            if w is self.embed.weight or (layout == "in_out") == (w.stride(0) == 1 and w.shape[0] > 1):
                continue
            w = w.t().contiguous().t() if layout == "in_out" else w.contiguous()
            m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)

    def reset_buffers(self):
        """After allocating on the meta device: recompute what is derived, not loaded."""
        if self.cfg.pos == "rope":
            self.rotary.reset(self.embed.weight.device)
        if self.cfg.tie_embeddings:   # to_empty() gives each module its own tensor: tie again
            self.head.weight = self.embed.weight

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        attn = type(self.layers[0].attn)
        ref = self.embed.weight
        return KVCache(attn.cache_shapes(self.cfg), self.cfg.num_layers, batch, max_len,
                       dtype or ref.dtype, device or ref.device)

    def forward(self, ids: torch.Tensor, start=0, cache: KVCache | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, vocab); with `last` ((B,) indices into T) only those
        positions' logits, (B, vocab): prefill needs one row per sequence, not T."""
        B, T = ids.shape
        step = Step(B, T, start, cache, self.backend, ids.device)
        x = self.embed(ids)                                    # (B, T, C)
        rope = None
        if self.cfg.pos == "learned":
            x = x + self.pos_embed(step.pos)
        else:
            rope = self.rotary(step.pos, x.dtype)
        for block in self.layers:
            x = block(x, rope, step)
        if last is not None:
            x = x[torch.arange(B, device=x.device), last]      # (B, C)
        return self.head(self.norm(x))

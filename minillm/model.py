"""The decoder: embedding -> N x (norm, attention, norm, MLP) -> norm -> head, read from a Config.

Parameter names here are the core names that adapters map checkpoints onto, e.g.
`layers.3.attn.qkv.weight` (q, k and v fused: one GEMM instead of three) and
`layers.3.mlp.gate_up.weight` (gate and up fused).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from . import cpu, decode_step, quant
from .attention import Step
from .cache import KVCache
from .config import Config, RunSettings
from .layers import MLP, Linear, RMSNorm, make_norm
from .mla import MLAttention
from .moe import MoE
from .rope import Rotary, apply_rope


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
        if step.cpu_decode:                                    # the same steps, fused (kernels/cpu_decode.c)
            norms = (self.q_norm.weight, self.k_norm.weight) if cfg.qk_norm else (None, None)
            return self.o(step.attend_qkv(self.layer, qkv, rope, (H, Hkv, D), norms, cfg.norm_eps, self.scale))
        qk = qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D)  # q heads, then k heads
        v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)        # (B, T, Hkv, D)
        if cfg.qk_norm:                                        # Qwen3: own weights for q and k
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), dim=2)
        if rope is not None:                                   # q and k heads in one rotation
            qk = apply_rope(qk, *rope)
        q, k = qk.split((H, Hkv), dim=2)                       # (B, T, H, D), (B, T, Hkv, D)
        o = step.attend(self.layer, q, k, v, self.scale)       # (B, T, H, D)
        return self.o(o.reshape(B, T, -1))


def make_attention(cfg: Config, layer: int) -> nn.Module:
    return MLAttention(cfg, layer) if cfg.attention == "mla" else Attention(cfg, layer)


def make_mlp(cfg: Config, layer: int) -> nn.Module:
    return MoE(cfg) if layer in cfg.moe_layers else MLP(cfg)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg, cfg.hidden_size), make_attention(cfg, layer)
        self.mlp_norm, self.mlp = make_norm(cfg, cfg.hidden_size), make_mlp(cfg, layer)

    def forward(self, x, rope, step):
        x = x + self.attn(self.attn_norm(x), rope, step)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """What runs is cfg (the architecture) plus run (backend, CPU plan, MLA absorption), both
    fixed here; the loader decides them (loader.settings) and builds this on the meta device."""

    def __init__(self, cfg: Config, run: RunSettings = RunSettings()):
        super().__init__()
        self.cfg, self.run = cfg, run
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.pos == "learned":
            self.pos_embed = nn.Embedding(cfg.max_position, cfg.hidden_size)
        else:
            self.rotary = Rotary(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if run.quantize:   # projections stored quantized (quant.py); the loader fills them by rows
            quant.quantize_modules(self, run.scheme, Linear, run.schemes)
        self.set_cpu_plan(run.cpu_plan)

    def fused_decode(self):
        """The decode step as one C call (decode_step.py), built on first use; None where it
        does not take this model (decode_step.why_not)."""
        if "_fused" not in self.__dict__:
            self._fused = None if decode_step.why_not(self) else decode_step.DecodeStep(self)
        return self._fused

    def _apply(self, fn, *args, **kwargs):   # .to(), .float(), ...: the weights move
        self.__dict__.pop("_fused", None)
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"arch={self.cfg.arch!r}, run={self.run}"

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:   # the activations' (a quantized model's weights are int8/int4)
        return self.norm.weight.dtype

    def set_cpu_plan(self, plan: str, onednn_min_bytes: int = 2**20):
        """How the Linear layers multiply on CPU (cpu.PLANS; cpu.plan measures which is fastest).
        Layout "in_out" keeps each weight's logical (out, in) shape for F.linear but stores it
        transposed, w.t().contiguous().t(), so BLAS sees its fast x @ W case. Names, shapes and
        values do not change; a tied head keeps the embedding's layout (which is read by rows).
        Free on the meta device, where the loader builds: weights are then allocated in their
        final layout and filled in place. oneDNN (for inputs of >= onednn_rows rows) costs ~10 us
        more per call than BLAS, more than it saves on a weight under 1 MiB."""
        layout, onednn_rows, loop_rows = cpu.PLANS[plan]
        self.run = replace(self.run, cpu_plan=plan)
        self.__dict__.pop("_fused", None)                     # it points at the weights
        for m in self.modules():
            if not isinstance(m, Linear):
                continue
            w = m.weight
            m.onednn_rows = onednn_rows if w.numel() * w.element_size() >= onednn_min_bytes else 0
            m.loop_rows = loop_rows if m.in_features % 32 == 0 else 0   # the loops read blocks of 32
            if w is getattr(self.embed, "weight", None) or (layout == "in_out") == (w.stride(0) == 1 and w.shape[0] > 1):
                continue
            w = w.t().contiguous().t() if layout == "in_out" else w.contiguous()
            m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)

    def reset_buffers(self):
        """After allocating on the meta device: recompute what is derived, not loaded."""
        self.__dict__.pop("_fused", None)
        if self.cfg.pos == "rope":
            self.rotary.reset(self.device)
        if self.cfg.tie_embeddings and not isinstance(self.embed, quant.QEmbedding):   # to_empty() untied them
            self.head.weight = self.embed.weight

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        attn = type(self.layers[0].attn)
        return KVCache(attn.cache_shapes(self.cfg), self.cfg.num_layers, batch, max_len,
                       dtype or self.dtype, device or self.device)

    def forward(self, ids: torch.Tensor, start=0, cache: KVCache | None = None,
                last: torch.Tensor | None = None, step: Step | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, vocab); with `last` ((B,) indices into T) only those
        positions' logits, (B, vocab): prefill needs one row per sequence, not T. `step`: a
        prepared one (the engine's paged step, over a flat batch: B == 1, `last` any length)."""
        B, T = ids.shape
        step = step or Step(B, T, start, cache, self.run, ids.device)
        x = self.embed(ids)                                    # (B, T, C)
        rope = None
        if self.cfg.pos == "learned":
            x = x + self.pos_embed(step.pos)
        else:
            rope = self.rotary(step.pos, x.dtype)
        if step.cpu_decode and B * T <= decode_step.MAX_ROWS and self.fused_decode():   # all in one call
            logits = self._fused(x, rope, step)                # (B, T, V)
            if last is None:
                return logits
            # the engine's flat batch (B == 1): rows of it, ~8 us where the fancy index below took ~30
            return logits[0].index_select(0, last) if B == 1 else logits[torch.arange(B, device=x.device), last]
        for block in self.layers:
            x = block(x, rope, step)
        if last is not None:
            x = x[torch.arange(B, device=x.device), last]      # (B, C)
        return self.head(self.norm(x))

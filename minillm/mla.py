"""Multi-head Latent Attention (DeepSeek-V2, arXiv:2405.04434, section 2.1; also V3).

Keys and values are compressed into one latent per token, c_kv = norm(W_DKV h) (kv_lora_rank
wide), plus one rotary key k_pe shared by all heads. The cache keeps only those two, per token and
layer (512 + 64 values for V3, instead of 128 heads x (192 + 128) for per-head K and V).

Per head, k_nope = W_UK c_kv and v = W_UV c_kv, with W_UK, W_UV the two halves of kv_b. Prefill
materialises them and runs ordinary attention. Decode absorbs them instead (section 2.1.2, the
remark after eq. 11): q_nope . (W_UK c_kv) = (W_UK^T q_nope) . c_kv, so the query is moved into the
latent space once and scored straight against the cache; the output stays a latent until W_UV and
then o are applied. A decode step then reads only the latent cache.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Step, sdpa, triton_attention
from .config import Config
from .layers import Linear, RMSNorm
from .rope import apply_rope


def latent_attention(q_latent, q_pe, c_kv, k_pe, scale: float, mask=None) -> torch.Tensor:
    """Attention in the latent space: MQA whose one key is [c_kv, k_pe] and whose value is c_kv.
    q_latent (B, T, H, R), q_pe (B, T, H, Dr), c_kv (B, S, R), k_pe (B, S, Dr),
    mask (B, 1, T, S) bool or None (all visible) -> latent output (B, T, H, R).
    The torch twin of minillm.kernels.mla_decode (which is this with T == 1)."""
    scores = (torch.einsum("bthr,bsr->bhts", q_latent, c_kv)
              + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)) * scale          # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(-1, dtype=torch.float32).to(c_kv.dtype)
    return torch.einsum("bhts,bsr->bthr", p, c_kv)


class MLAttention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        C, H, R = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank
        Dn, Dr, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:   # low-rank queries (V2, V3): q = W_UQ norm(W_DQ h)
            self.q_a = Linear(C, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, 1e-6)   # HF and DeepSeek: default eps, not rms_norm_eps
            self.q_b = Linear(cfg.q_lora_rank, H * (Dn + Dr), bias=False)
        else:                 # V2-Lite: one projection
            self.q = Linear(C, H * (Dn + Dr), bias=False)
        self.kv_a = Linear(C, R + Dr, bias=cfg.qkv_bias)   # -> [c_kv | k_pe]
        self.kv_a_norm = RMSNorm(R, 1e-6)
        self.kv_b = Linear(R, H * (Dn + Dv), bias=False)  # per head [W_UK; W_UV]
        self.o = Linear(H * Dv, C, bias=cfg.o_bias)
        self.scale = cfg.attn_scale or 1.0 / math.sqrt(Dn + Dr)

    @staticmethod
    def cache_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
        return {"c_kv": (cfg.kv_lora_rank,), "k_pe": (cfg.qk_rope_head_dim,)}

    def forward(self, x, rope, step: Step):
        B, T, _ = x.shape
        cfg = self.cfg
        H, R, Dn, Dr = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        q = self.q_b(self.q_a_norm(self.q_a(x))) if cfg.q_lora_rank else self.q(x)
        q_nope, q_pe = q.view(B, T, H, Dn + Dr).split([Dn, Dr], dim=-1)      # (B, T, H, Dn|Dr)
        c_kv, k_pe = self.kv_a(x).split([R, Dr], dim=-1)
        c_kv = self.kv_a_norm(c_kv)                                          # (B, T, R)
        # the checkpoints store rope dims interleaved; both sides come out as [evens | odds] (rope.py),
        # which leaves q_pe . k_pe as transformers computes it
        q_pe = apply_rope(q_pe, *rope, cfg.rope_interleaved)
        k_pe = apply_rope(k_pe[:, :, None], *rope, cfg.rope_interleaved)[:, :, 0]   # (B, T, Dr)
        o = step.attention(self.layer, dict(c_kv=c_kv, k_pe=k_pe), (q_nope, q_pe), self.attend)
        return self.o(o.reshape(B, T, -1))

    def attend(self, q_nope, q_pe, kv, step: Step):
        """kv: the cache's c_kv (B, S, R) and k_pe (B, S, Dr) -> (B, T, H, Dv)."""
        decode = step.T == 1 and step.cache is not None
        if step.absorb == "always" or (step.absorb == "auto" and decode):   # RunSettings.mla_absorb
            return self.absorbed(q_nope, q_pe, kv["c_kv"], kv["k_pe"], step)
        return self.materialised(q_nope, q_pe, kv["c_kv"], kv["k_pe"], step)

    def materialised(self, q_nope, q_pe, c_kv, k_pe, step: Step):
        """Expand the latent into per-head K and V, then ordinary attention -> (B, T, H, Dv)."""
        cfg = self.cfg
        B, S, _ = c_kv.shape
        H, Dn, Dr = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        k_nope, v = self.kv_b(c_kv).view(B, S, H, Dn + cfg.v_head_dim).split([Dn, cfg.v_head_dim], -1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, Dr)], dim=-1)   # (B, S, H, Dn + Dr)
        q = torch.cat([q_nope, q_pe], dim=-1)                                   # (B, T, H, Dn + Dr)
        attend = triton_attention if step.backend == "triton" else sdpa        # FlashAttention-2 or SDPA
        return attend(q, k, v, self.scale, step)

    def absorbed(self, q_nope, q_pe, c_kv, k_pe, step: Step):
        """Scores and output in the latent space; only the cache's c_kv and k_pe are read."""
        cfg = self.cfg
        H, Dn, R = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
        w = self.kv_b.dense(dtype=q_nope.dtype).view(H, Dn + cfg.v_head_dim, R)   # quantized: dequantized
        w_uk, w_uv = w[:, :Dn], w[:, Dn:]                                # (H, Dn, R), (H, Dv, R)
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)          # (B, T, H, R)
        if step.backend == "triton" and step.T == 1 and step.cache is not None:
            from minillm.kernels import mla_decode
            kv_len = step.pos[:, 0] + 1                                  # (B,) this token included
            o = mla_decode(q_latent[:, 0], q_pe[:, 0], c_kv, k_pe, kv_len, self.scale)[:, None]
        else:   # one new token of equal-length sequences sees the whole cache: no mask needed
            mask = None if step.uniform and step.T == 1 else step.mask()
            o = latent_attention(q_latent, q_pe, c_kv, k_pe, self.scale, mask)   # (B, T, H, R)
        return torch.einsum("bthr,hvr->bthv", o, w_uv)                   # (B, T, H, Dv)

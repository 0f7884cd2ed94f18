"""The layers every architecture shares: norms, the one Linear, activations, the MLP.

Every projection of every architecture (attention, MLP, MLA's low-rank and latent maps, the head) is
this module's `Linear`, so one mechanism decides how products run: the CPU plan (cpu.py) and, next,
quantized weights. Nothing here knows an architecture; the decoder (model.py) assembles them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .cpu import loops_linear, onednn_linear, upcast_bf16, upcast_linear
from .kernels import cpu_decode


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in one call instead of six (bit for bit the same arithmetic)
        if x.dtype == self.weight.dtype == torch.float32:
            if cpu_decode.few_rows(x):                         # decode: ~2 us, not ~10
                return cpu_decode.rmsnorm(x.contiguous(), self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # transformers' order: normalise in fp32, cast back, then scale (matters in bf16)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear whose CPU products may go elsewhere than torch's default (set by the run's CPU
    plan, see Decoder.set_cpu_plan and cpu.py): to minillm's own loops for few rows (bf16 decode
    reads its weights ~1.4x faster there than through oneDNN), or to oneDNN (where MKL takes a
    generic path, on AMD, its brgemm is up to 2x faster). The same result to fp32 rounding. The
    weight stays an ordinary (out, in) parameter either way (its storage may be transposed)."""
    onednn_rows = 0   # oneDNN for inputs of at least this many rows; 0: never
    loop_rows = 0     # kernels/cpu_gemv.c for inputs of at most this many rows; 0: never

    def dense(self, dtype=None) -> torch.Tensor:   # the (out, in) weight; quant.QLinear's dequantizes
        return self.weight if dtype is None else self.weight.to(dtype)

    def forward(self, x):
        if x.is_cpu and (self.loop_rows or self.onednn_rows):
            rows = x.numel() // x.shape[-1]
            if rows <= self.loop_rows:
                return loops_linear(x, self.weight, self.bias)
            if x.dtype is torch.bfloat16 and self.weight.dtype is torch.bfloat16 and rows > cpu_decode.MAX_ROWS and upcast_bf16():
                return upcast_linear(x, self.weight, self.bias)        # prefill without AMX
            if self.onednn_rows and rows >= self.onednn_rows:
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
            gu = self.gate_up(x)
            if self.act is F.silu and gu.dtype == torch.float32 and cpu_decode.few_rows(gu):   # decode: one call, not three
                return self.down(cpu_decode.silu_mul(gu.reshape(-1, gu.shape[-1])).view(*gu.shape[:-1], -1))
            gate, up = gu.split(self.inter, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(self.up(x)))

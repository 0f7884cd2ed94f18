"""Rotary position embeddings (RoFormer, arXiv:2104.09864) and their context-extension variants.

inv_freq follows transformers' modeling_rope_utils exactly (same float32 ops in the same order), so
cos/sin agree bit for bit: "default", "linear" (position interpolation), "llama3" (Llama 3.1's
wavelength-banded scaling) and "yarn" (arXiv:2309.00071, with DeepSeek's mscale pair).
"""
from __future__ import annotations

import math

import torch


def get_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN's attention temperature: sqrt(1/t) = 0.1 ln(s) + 1
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq, s):
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are interpolated by `factor`, short ones kept, the band between blended
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim, theta, s, max_position):
    factor = s.get("factor") or max_position / s["original_max_position_embeddings"]
    old_len = s["original_max_position_embeddings"]
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    scaling = s.get("attention_factor")
    if scaling is None:
        scaling = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
                   if mscale and mscale_all else get_mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension that turns `rotations` times over old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(scaling)


def rope_frequencies(dim: int, theta: float, scaling: dict | None, max_position: int):
    """-> (inv_freq (dim/2,) float32, scale applied to cos and sin)."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return _base_inv_freq(dim, theta), 1.0
    if kind == "linear":
        return _base_inv_freq(dim, theta) / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(_base_inv_freq(dim, theta), scaling), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, max_position)
    if kind == "freq_factors":   # llama.cpp's rope_freqs tensor (GGUF Llama 3.x): one divisor per frequency
        return _base_inv_freq(dim, theta) / torch.tensor(scaling["factors"], dtype=torch.float32), 1.0
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3, yarn)")


class Rotary(torch.nn.Module):
    """cos/sin for given positions, computed once per forward and shared by every layer."""

    def __init__(self, dim, theta, scaling, max_position):
        super().__init__()
        self.args = (dim, theta, scaling, max_position)
        self.reset("cpu")

    def reset(self, device):
        with torch.device("cpu"):   # never on the meta device: these are computed, not loaded
            inv_freq, self.scale = rope_frequencies(*self.args)
        self.inv_freq = inv_freq.to(device)

    def forward(self, pos: torch.Tensor, dtype: torch.dtype):
        if self.inv_freq.device != pos.device:
            self.inv_freq = self.inv_freq.to(pos.device)
        freqs = pos[..., None].float() * self.inv_freq       # (B, T, D/2), fp32 as transformers
        emb = torch.cat((freqs, freqs), dim=-1)                 # (B, T, D)
        cos, sin = emb.cos() * self.scale, emb.sin() * self.scale
        return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]  # (B, T, 1, D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False):
    """x (B, T, H, D). Halves layout rotates (x[:D/2], x[D/2:]) pairs; the interleaved layout
    (pairs 2i, 2i+1, as DeepSeek stores them) is first permuted to [evens | odds], as
    transformers' DeepSeek-V3 does, which gives the same result as rotating complex pairs."""
    if interleaved:
        b, t, h, d = x.shape
        x = x.view(b, t, h, d // 2, 2).transpose(3, 4).reshape(b, t, h, d)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

"""Launchers for cpu_decode.c (built with cpu_gemv.c into one library) and their torch references.

    attend_decode(q, k, v, rows, lens, scale)   q (B, H, D) fp32 (rows may be strided); k, v (rows,
                                                Hkv, D|Dv) fp32/bf16; rows (B, S) int64 cache rows,
                                                lens (B,)                                -> (B, H, Dv)
    qkv_store(qkv, H, Hkv, cos, sin, k, v, write_rows, q_norm, k_norm, eps)
                                                in place: qk-norm, rotary, k and v into the cache
    rmsnorm(x, w, eps)                          x (R, C), w (C,) fp32                    -> (R, C)
    silu_mul(gu)                                (M, 2I) -> silu(gu[:, :I]) * gu[:, I:]   (M, I)
All fp32 activations. None is a NULL pointer (no norm, no rotary).
"""
from __future__ import annotations

import torch

from .cpu_gemv import MAX_ROWS, _lib, available, f32, few_rows  # noqa: F401  (for callers: what runs here, few rows)


def _p(t):
    return None if t is None else t.data_ptr()


def attend_decode(q, k, v, rows, lens, scale: float) -> torch.Tensor:
    B, H, D = q.shape
    Hkv, Dv = k.shape[-2], v.shape[-1]
    assert q.dtype == torch.float32 and q.stride()[1:] == (D, 1) and k.dtype == v.dtype in (torch.float32, torch.bfloat16)
    assert k.stride()[-2:] == (D, 1) and v.stride()[-2:] == (Dv, 1) and H % Hkv == 0
    assert rows.dtype == lens.dtype == torch.int64 and rows.is_contiguous() and rows.shape[0] == lens.shape[0] == B
    out = torch.empty(B, H, Dv)
    _lib().attend_decode(B, H, Hkv, D, Dv, rows.shape[1], q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(),
                         int(k.dtype == torch.bfloat16), rows.data_ptr(), lens.data_ptr(), scale,
                         out.data_ptr(), min(torch.get_num_threads(), B * H))
    return out


def qkv_store(qkv, H: int, Hkv: int, cos, sin, k, v, write_rows, q_norm=None, k_norm=None, eps: float = 0.0):
    B, D = qkv.shape[0], k.shape[-1]
    assert qkv.dtype == torch.float32 and qkv.is_contiguous() and qkv.shape[1] == (H + 2 * Hkv) * D
    assert k.dtype == v.dtype in (torch.float32, torch.bfloat16) and k.shape[-2:] == v.shape[-2:] == (Hkv, D)
    assert write_rows.dtype == torch.int64 and write_rows.is_contiguous() and write_rows.numel() == B
    for t in (cos, sin, q_norm, k_norm):
        assert t is None or (t.dtype == torch.float32 and t.is_contiguous())
    _lib().qkv_store(B, H, Hkv, D, qkv.data_ptr(), _p(q_norm), _p(k_norm), eps, _p(cos), _p(sin),
                     k.data_ptr(), v.data_ptr(), int(k.dtype == torch.bfloat16), write_rows.data_ptr())


def silu_mul(gu) -> torch.Tensor:
    M, I2 = gu.shape
    assert gu.dtype == torch.float32 and gu.is_contiguous()
    out = torch.empty(M, I2 // 2)
    _lib().silu_mul(M, I2 // 2, gu.data_ptr(), 0, out.data_ptr())
    return out


def rmsnorm(x, w, eps: float) -> torch.Tensor:
    assert x.dtype == w.dtype == torch.float32 and x.is_contiguous() and w.is_contiguous()
    out = torch.empty_like(x)
    _lib().rmsnorm(x.numel() // x.shape[-1], x.shape[-1], x.data_ptr(), w.data_ptr(), eps, 0, out.data_ptr())
    return out


# -- the torch references ---------------------------------------------------------------------

def attend_decode_ref(q, k, v, rows, lens, scale: float) -> torch.Tensor:
    B, H, D = q.shape
    Hkv = k.shape[-2]
    out = []
    for b in range(B):
        kb = k.flatten(0, -3)[rows[b, :lens[b]]].float().repeat_interleave(H // Hkv, 1)   # (S, H, D)
        vb = v.flatten(0, -3)[rows[b, :lens[b]]].float().repeat_interleave(H // Hkv, 1)
        p = torch.einsum("hd,shd->hs", q[b], kb).mul(scale).softmax(-1)
        out.append(torch.einsum("hs,shd->hd", p, vb))
    return torch.stack(out)


def rmsnorm_ref(x, w, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def qkv_store_ref(qkv, H, Hkv, cos, sin, k, v, write_rows, q_norm=None, k_norm=None, eps=0.0):
    B, D = qkv.shape[0], k.shape[-1]
    x = qkv.view(B, H + 2 * Hkv, D)
    for w, heads in ((q_norm, slice(0, H)), (k_norm, slice(H, H + Hkv))):
        if w is not None:
            x[:, heads] = rmsnorm_ref(x[:, heads], w, eps)
    if cos is not None:
        qk = x[:, :H + Hkv]
        x1, x2 = qk.chunk(2, dim=-1)
        x[:, :H + Hkv] = qk * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]
    k.flatten(0, -3)[write_rows] = x[:, H:H + Hkv].to(k.dtype)
    v.flatten(0, -3)[write_rows] = x[:, H + Hkv:].to(v.dtype)


def silu_mul_ref(gu):
    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u

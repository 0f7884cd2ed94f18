"""Weight-only int8/int4 products for decode on GPU: y = x @ W.T with W dequantized in registers.

At batch 1 a decode step reads every weight once, so on a GPU too the bytes per weight set the
speed (gpt-fast: Llama-2-7B 105 -> 156 tok/s in int8, 197 in int4). Here a weight stays in the
layout the CPU loops read (quant.py, kernels/cpu_gemv.c), so one quantized model runs on either:
    int8   q (N, K) int8,  d (N, K/G) fp16:            w[n, k] = q[n, k] d[n, k/G]
    int4   q (N, K/2) uint8 in llama.cpp's Q4 block order (block b's byte j: value 32b + j in the
           low nibble, 32b + j + 16 in the high one), d, m (N, K/G) fp16:  w = q d + m
Program p computes y[:, p BLOCK_N : (p + 1) BLOCK_N] for all M <= 8 rows of x: each weight tile is
read once for every row, dequantized to fp32 and multiplied as a broadcast sum (M is too small for
tl.dot's 16-row tiles). x is not rounded (the GPU's prefill multiplies the same x with the
dequantized weight, so cached decoding equals a full forward there too).

    quant_gemv(x, q, d, m=None)    x (M, K) fp32/bf16/fp16 -> (M, N) in x's dtype
    quant_gemv_ref(x, q, d, m)     the torch reference: x @ dequantized W.T in fp32
"""
from __future__ import annotations

import torch

from ._common import check_same_device, is_interpreted, require_triton, tl, triton
from .cpu_gemv import dequant_int4_ref, dequant_int8_ref

MAX_ROWS = 8   # as the CPU loops' (quant.Packed.mm sends this many rows to either)


@triton.jit
def _quant_gemv(X, Q, D, MN, Y, M, N, K, G, stride_xm, stride_ym, BITS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w_ok = n_ok[:, None] & k_ok[None, :]
        if BITS == 4:   # column k: byte 16 (k / 32) + k % 16 of the row, high nibble when k % 32 >= 16
            byte = (offs_k // 32) * 16 + offs_k % 16
            raw = tl.load(Q + offs_n[:, None] * (K // 2) + byte[None, :], mask=w_ok, other=0).to(tl.int32)
            v = ((raw >> (((offs_k % 32) // 16) * 4)[None, :]) & 15).to(tl.float32)
        else:
            v = tl.load(Q + offs_n[:, None] * K + offs_k[None, :], mask=w_ok, other=0).to(tl.float32)
        scale_at = offs_n[:, None] * (K // G) + (offs_k // G)[None, :]
        w = v * tl.load(D + scale_at, mask=w_ok, other=0).to(tl.float32)          # (BLOCK_N, BLOCK_K)
        if BITS == 4:
            w += tl.load(MN + scale_at, mask=w_ok, other=0).to(tl.float32)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0).to(tl.float32)                                        # (BLOCK_M, BLOCK_K)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def quant_gemv(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None, *,
               block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """x (M, K), 1 <= M <= 8 -> (M, N) in x's dtype; m given: int4 (q (N, K/2)), else int8."""
    require_triton()
    bits = 8 if m is None else 4
    N, K = q.shape[0], q.shape[1] * (2 if bits == 4 else 1)
    M = x.shape[0]
    assert x.dim() == 2 and x.shape[1] == K and 1 <= M <= MAX_ROWS and K % d.shape[1] == 0, (x.shape, q.shape, d.shape)
    assert q.is_contiguous() and d.is_contiguous() and (m is None or (m.is_contiguous() and m.shape == d.shape))
    assert bits == 8 or (K // d.shape[1]) % 32 == 0, "int4 groups are whole blocks of 32"
    check_same_device(x, q, d, *([] if m is None else [m]))
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    small = is_interpreted(x)   # the interpreter runs every lane in numpy: small tiles for tests
    BLOCK_N = block_n or (16 if small else 64)
    BLOCK_K = block_k or (32 if small else 128)
    _quant_gemv[(triton.cdiv(N, BLOCK_N),)](
        x, q, d, d if m is None else m, y, M, N, K, K // d.shape[1], x.stride(0), y.stride(0), BITS=bits,
        BLOCK_M=triton.next_power_of_2(M), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def quant_gemv_ref(x, q, d, m=None) -> torch.Tensor:
    w = dequant_int8_ref(q, d) if m is None else dequant_int4_ref(q, d, m)
    return (x.float() @ w.t()).to(x.dtype)

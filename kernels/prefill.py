"""FlashAttention-2 prefill over a KV cache (causal, with an offset for chunked prefill).

Shapes:
    q        (B, T, H, Dqk)     the T new tokens of every sequence; any strides
    k_cache  (B, S, Hkv, Dqk)   the new tokens' keys already written at [start[b], start[b]+T)
    v_cache  (B, S, Hkv, Dv)    Dv may differ from Dqk (MLA prefill: 192 / 128)
    start    (B,)               position of q[b, 0] in its sequence
    o        (B, T, H, Dv)      dtype of q

Query t of sequence b sees keys j <= start[b] + t: everything already in the cache plus
the new tokens up to itself. Keys past start[b] + T - 1 are never read (they may be junk).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ._common import (
    _dot, block_dim, check_same_device, dot_ieee, dot_upcast, is_interpreted, require_triton, tl, triton,
)

LOG2E = 1.4426950408889634  # scores are kept in base 2 so the kernel can use exp2


@triton.jit
def _prefill_kernel(
    Q, K, V, O, START,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    T, D_QK, D_V,
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr,  # query heads per kv head (H // Hkv)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    # int64 batch index: b * stride_kb overflows int32 for big caches (64 x 32k x 8 x 128 = 2^31).
    b = tl.program_id(2).to(tl.int64)
    kvh = h // GROUP  # GQA by index: no repeated K/V in memory

    start = tl.load(START + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this tile, (BLOCK_M,)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)  # padded to a power of two, masked to D_QK
    offs_dv = tl.arange(0, BLOCK_DV)
    q_pos = start + offs_m  # absolute position of each query row
    m_valid = offs_m < T

    q_ptrs = Q + b * stride_qb + offs_m[:, None] * stride_qt + h * stride_qh + offs_dqk[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & (offs_dqk[None, :] < D_QK), other=0.0)  # (BLOCK_M, BLOCK_DQK)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    # Online softmax state, fp32: running max m_i, running sum l_i, unnormalised output acc.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # The last query row of this tile sees keys < kv_end; K/V tiles past it are fully masked
    # for every row, so the loop stops there instead of visiting and masking them.
    kv_end = start + tl.minimum((pid_m + 1) * BLOCK_M, T)
    for n0 in range(0, kv_end, BLOCK_N):
        cols = n0 + offs_n  # key positions, (BLOCK_N,)
        n_valid = cols < kv_end
        k = tl.load(
            k_base + cols[:, None] * stride_ks + offs_dqk[None, :] * stride_kd,
            mask=n_valid[:, None] & (offs_dqk[None, :] < D_QK), other=0.0,
        )  # (BLOCK_N, BLOCK_DQK)
        v = tl.load(
            v_base + cols[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
            mask=n_valid[:, None] & (offs_dv[None, :] < D_V), other=0.0,
        )  # (BLOCK_N, BLOCK_DV)

        s = _dot(q, tl.trans(k), DOT_IEEE, DOT_UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        # Causal with offset. Only the tiles crossing the diagonal need it, but applying it
        # everywhere costs one select per element and keeps a single loop.
        visible = (cols[None, :] <= q_pos[:, None]) & n_valid[None, :]
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing visible yet keep m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # p goes to V's dtype for the tensor-core dot (bf16/fp16); stays fp32 for fp32 inputs.
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_IEEE, DOT_UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # only padding rows (offs_m >= T) can have l == 0
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < D_V))


def _prefill_config(q: torch.Tensor, d_qk_pad: int, d_v_pad: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if is_interpreted(q):
        # Interpreter: 16x16 tiles so that tiny test shapes cross several tile edges.
        return 16, 16, 4, 1
    # GPU: 64-row query tiles; K/V tiles sized to keep 2 pipeline stages of K+V in shared memory
    # (64 keys x 128 dims x 2 B x 2 tensors x 2 stages = 64 KB) also for wide heads and fp32.
    width = max(d_qk_pad, d_v_pad) * q.element_size()
    block_n = 64 if width <= 256 else 32
    return 64, block_n, 4, 2


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal attention of T new tokens per sequence over the KV cache -> (B, T, H, Dv).

    ``block_m`` / ``block_n`` override the tile sizes (tests, tuning); powers of two >= 16.
    """
    require_triton()
    B, T, H, D_QK = q.shape
    Bk, S, HKV, D_QK_K = k_cache.shape
    D_V = v_cache.shape[-1]
    assert Bk >= B and D_QK_K == D_QK, (q.shape, k_cache.shape)
    assert v_cache.shape[:3] == k_cache.shape[:3], (k_cache.shape, v_cache.shape)
    assert H % HKV == 0, f"query heads {H} not a multiple of kv heads {HKV}"
    assert start.shape == (B,), start.shape
    check_same_device(q, k_cache, v_cache, start)
    start = start.to(torch.int32)

    o = torch.empty((B, T, H, D_V), dtype=q.dtype, device=q.device)
    if B == 0 or T == 0:
        return o
    BLOCK_DQK, BLOCK_DV = block_dim(D_QK), block_dim(D_V)
    bm, bn, num_warps, num_stages = _prefill_config(q, BLOCK_DQK, BLOCK_DV)
    bm, bn = block_m or bm, block_n or bn

    grid = (triton.cdiv(T, bm), H, B)
    _prefill_kernel[grid](
        q, k_cache, v_cache, o, start,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *o.stride(),
        T, D_QK, D_V,
        float(scale) * LOG2E,
        GROUP=H // HKV,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQK=BLOCK_DQK, BLOCK_DV=BLOCK_DV,
        DOT_IEEE=dot_ieee(q), DOT_UPCAST=dot_upcast(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return o


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch reference: SDPA in fp32 with the explicit boolean mask j <= start[b] + t."""
    B, T, H, _ = q.shape
    HKV = k_cache.shape[2]
    k = k_cache[:B].float().transpose(1, 2).repeat_interleave(H // HKV, dim=1)  # (B, H, S, Dqk)
    v = v_cache[:B].float().transpose(1, 2).repeat_interleave(H // HKV, dim=1)  # (B, H, S, Dv)
    S = k.shape[2]
    q_pos = start.to(q.device).long()[:, None] + torch.arange(T, device=q.device)  # (B, T)
    mask = torch.arange(S, device=q.device)[None, None, :] <= q_pos[:, :, None]  # (B, T, S)
    o = F.scaled_dot_product_attention(q.float().transpose(1, 2), k, v, attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2).to(q.dtype)  # (B, T, H, Dv)


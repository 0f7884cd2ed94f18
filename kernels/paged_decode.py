"""Paged decode: flash-decoding (decode.py) reading K/V through a block table, not a copy.

Shapes:
    q            (B, H, Dqk)
    k_pool       (slots, Hkv, Dqk)    slot s of block n is row n * block_size + s (engine/paged.py)
    v_pool       (slots, Hkv, Dv)
    block_table  (B, max_blocks)      int: sequence b's key j sits in block block_table[b, j // block_size]
    kv_len       (B,)                 keys 0 .. kv_len[b]-1 are valid (>= 1)
    o            (B, H, Dv)

The split over the sequence, the online softmax and the merge are decode.py's; the one change is
where a key tile is read from: each key's row is looked up in the block table (vLLM's paged
attention), so the engine need not gather a contiguous copy of every sequence's cache per layer.
"""
from __future__ import annotations

import torch

from ._common import block_dim, check_same_device, dot_ieee, dot_upcast, require_triton, tl, triton
from .decode import (LOG2E, _attend_tile, _decode_config, _split_range, _store_split, decode_attention_ref,
                     merge_splits, pick_num_splits)


@triton.jit
def _paged_split_kernel(
    Q, K, V, TABLE, KV_LEN, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_tb,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    D_QK, D_V, qk_scale,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(KV_LEN + b)
    lo, hi = _split_range(kv_len, split, tl.num_programs(2), BLOCK_N)

    offs_g = tl.arange(0, BLOCK_G)
    g_valid = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_dqk[None, :] * stride_qd,
                mask=g_valid[:, None] & (offs_dqk[None, :] < D_QK), other=0.0)   # (BLOCK_G, BLOCK_DQK)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        n_valid = cols < hi
        blk = tl.load(TABLE + b * stride_tb + cols // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
        rows = blk * BLOCK_SIZE + cols % BLOCK_SIZE                                # (BLOCK_N,) pool rows
        k = tl.load(K + rows[:, None] * stride_ks + kvh * stride_kh + offs_dqk[None, :] * stride_kd,
                    mask=n_valid[:, None] & (offs_dqk[None, :] < D_QK), other=0.0)
        v = tl.load(V + rows[:, None] * stride_vs + kvh * stride_vh + offs_dv[None, :] * stride_vd,
                    mask=n_valid[:, None] & (offs_dv[None, :] < D_V), other=0.0)
        m_i, l_i, acc = _attend_tile(q, k, v, n_valid, m_i, l_i, acc, qk_scale, DOT_IEEE, DOT_UPCAST)

    _store_split(O_PART, LSE_PART, b, heads, split, m_i, l_i, acc, g_valid, offs_dv, D_V,
                 stride_pb, stride_ph, stride_ps, stride_lb, stride_lh)


def paged_decode_attention(q, k_pool, v_pool, block_table, kv_len, block_size: int, scale: float,
                           num_splits: int | None = None) -> torch.Tensor:
    """One decode step of attention over a paged KV pool -> (B, H, Dv)."""
    require_triton()
    B, H, D_QK = q.shape
    _, HKV, D_V = v_pool.shape
    assert k_pool.shape[:2] == v_pool.shape[:2] and k_pool.shape[2] == D_QK, (k_pool.shape, v_pool.shape)
    assert H % HKV == 0 and block_table.shape[0] == B and kv_len.shape == (B,)
    check_same_device(q, k_pool, v_pool, block_table, kv_len)
    kv_len, block_table = kv_len.to(torch.int32), block_table.to(torch.int32)
    o = torch.empty((B, H, D_V), dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    BLOCK_DQK, BLOCK_DV = block_dim(D_QK), block_dim(D_V)
    bn, num_warps, num_stages = _decode_config(q, BLOCK_DQK, BLOCK_DV)
    if num_splits is None:
        num_splits = pick_num_splits(int(kv_len.max()), B * HKV, q.device)
    o_part = torch.empty((B, H, num_splits, D_V), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    _paged_split_kernel[(B, HKV, num_splits)](
        q, k_pool, v_pool, block_table, kv_len, o_part, lse_part,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), block_table.stride(0),
        *o_part.stride()[:3], *lse_part.stride()[:2],
        D_QK, D_V, float(scale) * LOG2E,
        BLOCK_SIZE=block_size, GROUP=H // HKV, BLOCK_G=max(16, triton.next_power_of_2(H // HKV)),
        BLOCK_N=bn, BLOCK_DQK=BLOCK_DQK, BLOCK_DV=BLOCK_DV,
        DOT_IEEE=dot_ieee(q), DOT_UPCAST=dot_upcast(q), num_warps=num_warps, num_stages=num_stages,
    )
    return merge_splits(o_part, lse_part, o)


def paged_decode_attention_ref(q, k_pool, v_pool, block_table, kv_len, block_size: int, scale: float,
                               num_splits: int | None = None) -> torch.Tensor:
    """Torch reference: gather each sequence's keys through its block table, then decode_attention_ref."""
    S = block_table.shape[1] * block_size
    pos = torch.arange(S, device=q.device)
    rows = block_table.long()[:, pos // block_size] * block_size + pos % block_size   # (B, S)
    return decode_attention_ref(q, k_pool[rows], v_pool[rows], kv_len, scale)

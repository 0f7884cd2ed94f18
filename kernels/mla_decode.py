"""MLA (DeepSeek Multi-head Latent Attention) decode on the latent cache, queries absorbed.

Shapes:
    q_latent (B, H, R)    query already multiplied by W_UK (R = kv_lora_rank: 512 in V3)
    q_pe     (B, H, Dr)   rotary part of the query (Dr = qk_rope_head_dim: 64 in V3)
    c_kv     (B, S, R)    compressed latent cache, shared by all heads; also serves as V
    k_pe     (B, S, Dr)   rotary key part, shared by all heads
    kv_len   (B,)         valid entries 0 .. kv_len[b]-1 (>= 1)
    o        (B, H, R)    latent output (the caller applies W_UV); dtype of q_latent

score[h, j] = (q_latent[h] . c_kv[j] + q_pe[h] . k_pe[j]) * scale, o[h] = softmax_j(score) @ c_kv.
This is multi-query attention with one 576-wide key and a 512-wide value that is a prefix
of the key, so a program takes a block of heads and reads each latent tile once for all of
them, using it both for the scores and for the output. The sequence is split as in
decode.py and the splits are merged by the same kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    _dot, block_dim, check_same_device, dot_ieee, dot_upcast, is_interpreted, require_triton, tl, triton,
)
from .decode import LOG2E, _split_range, _store_split, merge_splits, pick_num_splits


@triton.jit
def _mla_decode_split_kernel(
    QL, QP, CKV, KPE, KV_LEN, O_PART, LSE_PART,
    stride_qlb, stride_qlh, stride_qld,
    stride_qpb, stride_qph, stride_qpd,
    stride_cb, stride_cs, stride_cd,
    stride_kb, stride_ks, stride_kd,
    stride_pb, stride_ph, stride_ps,  # O_PART (B, H, splits, R), last dim contiguous
    stride_lb, stride_lh,  # LSE_PART (B, H, splits), last dim contiguous
    H, R, DR,
    qk_scale,  # caller's softmax scale * log2(e)
    BLOCK_H: tl.constexpr,  # heads per program, >= 16 for tl.dot
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    kv_len = tl.load(KV_LEN + b)
    lo, hi = _split_range(kv_len, split, num_splits, BLOCK_N)

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_valid = heads < H  # the last head block may be partial (H not a multiple of BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)  # R padded to a power of two, masked
    offs_dr = tl.arange(0, BLOCK_DR)

    ql = tl.load(
        QL + b * stride_qlb + heads[:, None] * stride_qlh + offs_r[None, :] * stride_qld,
        mask=h_valid[:, None] & (offs_r[None, :] < R), other=0.0,
    )  # (BLOCK_H, BLOCK_R)
    qp = tl.load(
        QP + b * stride_qpb + heads[:, None] * stride_qph + offs_dr[None, :] * stride_qpd,
        mask=h_valid[:, None] & (offs_dr[None, :] < DR), other=0.0,
    )  # (BLOCK_H, BLOCK_DR)
    c_base = CKV + b * stride_cb
    k_base = KPE + b * stride_kb

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        n_valid = cols < hi
        c = tl.load(
            c_base + cols[:, None] * stride_cs + offs_r[None, :] * stride_cd,
            mask=n_valid[:, None] & (offs_r[None, :] < R), other=0.0,
        )  # (BLOCK_N, BLOCK_R): the latent tile, read once, used as key and as value
        kp = tl.load(
            k_base + cols[:, None] * stride_ks + offs_dr[None, :] * stride_kd,
            mask=n_valid[:, None] & (offs_dr[None, :] < DR), other=0.0,
        )  # (BLOCK_N, BLOCK_DR)
        s = _dot(ql, tl.trans(c), DOT_IEEE, DOT_UPCAST) + _dot(qp, tl.trans(kp), DOT_IEEE, DOT_UPCAST)
        s = tl.where(n_valid[None, :], s * qk_scale, float("-inf"))  # (BLOCK_H, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: a visited tile has >= 1 valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(c.dtype), c, DOT_IEEE, DOT_UPCAST)
        m_i = m_new

    _store_split(O_PART, LSE_PART, b, heads, split, m_i, l_i, acc, h_valid, offs_r, R,
                 stride_pb, stride_ph, stride_ps, stride_lb, stride_lh)   # the latent is the value


def _mla_config(q: torch.Tensor, r_pad: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps, num_stages)."""
    if is_interpreted(q):
        return 16, 16, 4, 1  # small tiles so tiny test lengths span several tiles and splits
    # 16 heads x 512 fp32 accumulator = 32 KB of registers: 8 warps for R = 512. A 32-key
    # bf16 latent tile is 32 KB of shared memory per stage; halve it for fp32 inputs.
    block_n = 32 if r_pad * q.element_size() <= 1024 else 16
    return 16, block_n, (8 if r_pad >= 512 else 4), 2


def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """One MLA decode step on the latent cache -> (B, H, R).

    ``scale`` is the model's softmax scale (1/sqrt(qk_head_dim), YaRN-adjusted), not
    1/sqrt(R + Dr). num_splits=None picks it from max(kv_len) (one device->host sync).
    """
    require_triton()
    B, H, R = q_latent.shape
    DR = q_pe.shape[-1]
    assert q_pe.shape[:2] == (B, H), (q_latent.shape, q_pe.shape)
    assert c_kv.shape[0] >= B and c_kv.shape[2] == R, (q_latent.shape, c_kv.shape)
    assert k_pe.shape[:2] == c_kv.shape[:2] and k_pe.shape[2] == DR, (c_kv.shape, k_pe.shape)
    assert kv_len.shape == (B,), kv_len.shape
    check_same_device(q_latent, q_pe, c_kv, k_pe, kv_len)
    kv_len = kv_len.to(torch.int32)

    o = torch.empty((B, H, R), dtype=q_latent.dtype, device=q_latent.device)
    if B == 0:
        return o
    BLOCK_R, BLOCK_DR = block_dim(R), block_dim(DR)
    block_h, bn, num_warps, num_stages = _mla_config(q_latent, BLOCK_R)
    bn = block_n or bn
    head_blocks = triton.cdiv(H, block_h)
    if num_splits is None:
        num_splits = pick_num_splits(min(int(kv_len.max()), c_kv.shape[1]), B * head_blocks, q_latent.device)

    o_part = torch.empty((B, H, num_splits, R), dtype=torch.float32, device=o.device)
    lse_part = torch.empty((B, H, num_splits), dtype=torch.float32, device=o.device)
    _mla_decode_split_kernel[(B, head_blocks, num_splits)](
        q_latent, q_pe, c_kv, k_pe, kv_len, o_part, lse_part,
        *q_latent.stride(), *q_pe.stride(), *c_kv.stride(), *k_pe.stride(),
        *o_part.stride()[:3], *lse_part.stride()[:2],
        H, R, DR,
        float(scale) * LOG2E,
        BLOCK_H=block_h, BLOCK_N=bn, BLOCK_R=BLOCK_R, BLOCK_DR=BLOCK_DR,
        DOT_IEEE=dot_ieee(q_latent), DOT_UPCAST=dot_upcast(q_latent),
        num_warps=num_warps, num_stages=num_stages,
    )
    return merge_splits(o_part, lse_part, o)


def mla_decode_ref(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
    num_splits: int | None = None,  # accepted for signature parity; the reference does not split
) -> torch.Tensor:
    """Torch reference: MQA in fp32 with key [c_kv, k_pe], value c_kv and mask j < kv_len[b]."""
    B = q_latent.shape[0]
    q = torch.cat([q_latent, q_pe], dim=-1).float()  # (B, H, R + Dr)
    k = torch.cat([c_kv[:B], k_pe[:B]], dim=-1).float()[:, None]  # (B, 1, S, R + Dr): one shared kv head
    v = c_kv[:B].float()[:, None]  # (B, 1, S, R)
    S = k.shape[2]
    mask = torch.arange(S, device=q.device)[None, :] < kv_len.to(q.device).long()[:, None]  # (B, S)
    # SDPA broadcasts the single kv head over the H query heads.
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scale)
    return o[:, :, 0].to(q_latent.dtype)  # (B, H, R)

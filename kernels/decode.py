"""Flash-decoding: one query token per sequence against the KV cache, split over the sequence.

Shapes:
    q        (B, H, Dqk)         any strides
    k_cache  (B, S, Hkv, Dqk)
    v_cache  (B, S, Hkv, Dv)
    kv_len   (B,)                keys 0 .. kv_len[b]-1 are valid (kv_len[b] >= 1)
    o        (B, H, Dv)          dtype of q

A single query row gives one program per (sequence, kv head) too little parallelism at
small batch, so stage 1 also splits the sequence: program (b, kv head, split) computes the
softmax-normalised partial output of all query heads of its GQA group over its slice of
keys, plus the slice's log-sum-exp. Stage 2 merges the splits of each (b, h) with weights
exp(lse_s - max lse). Both stages keep scores in base 2 (exp2/log2), consistently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import (
    _dot, block_dim, check_same_device, dot_ieee, dot_upcast, is_interpreted, require_triton, tl, triton,
)

LOG2E = 1.4426950408889634


@triton.jit
def _split_range(kv_len, split, num_splits, BLOCK_N: tl.constexpr):
    """Key range [lo, hi) of one split: kv_len cut into num_splits chunks of whole BLOCK_N tiles.

    The chunk size follows each sequence's own length, so a short sequence in a batch of long
    ones still spreads over the splits it needs; trailing splits can be empty (lo >= hi).
    """
    tiles = (kv_len + BLOCK_N - 1) // BLOCK_N
    chunk = (tiles + num_splits - 1) // num_splits * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)
    return lo, hi


@triton.jit
def _attend_tile(q, k, v, n_valid, m_i, l_i, acc, qk_scale, DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One K/V tile of the online softmax (base 2) for a GQA group's queries -> (m_i, l_i, acc).
    Every visited tile has >= 1 valid key, so m_new is finite: no -inf guard needed."""
    s = _dot(q, tl.trans(k), DOT_IEEE, DOT_UPCAST) * qk_scale  # (BLOCK_G, BLOCK_N)
    s = tl.where(n_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_IEEE, DOT_UPCAST)
    return m_new, l_i, acc


@triton.jit
def _store_split(O_PART, LSE_PART, b, heads, split, m_i, l_i, acc, g_valid, offs_dv, D_V,
                 stride_pb, stride_ph, stride_ps, stride_lb, stride_lh):
    """A split's normalised partial output and its log2-sum-exp. An empty split (lo >= hi: past
    this sequence's kv_len) stores lse = -inf and zeros, so the merge gives it weight 0."""
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    tl.store(
        O_PART + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_dv[None, :],
        out, mask=g_valid[:, None] & (offs_dv[None, :] < D_V),
    )
    tl.store(LSE_PART + b * stride_lb + heads * stride_lh + split, lse, mask=g_valid)


@triton.jit
def _decode_split_kernel(
    Q, K, V, KV_LEN, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_pb, stride_ph, stride_ps,  # O_PART (B, H, splits, Dv), last dim contiguous
    stride_lb, stride_lh,  # LSE_PART (B, H, splits), last dim contiguous
    D_QK, D_V,
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_G: tl.constexpr,  # GROUP padded to >= 16 rows: tl.dot needs 16 on the M side
    BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride_kb can pass 2^31
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    kv_len = tl.load(KV_LEN + b)
    lo, hi = _split_range(kv_len, split, num_splits, BLOCK_N)

    offs_g = tl.arange(0, BLOCK_G)
    g_valid = offs_g < GROUP
    heads = kvh * GROUP + offs_g  # the query heads sharing this kv head, (BLOCK_G,)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_dqk[None, :] * stride_qd,
        mask=g_valid[:, None] & (offs_dqk[None, :] < D_QK), other=0.0,
    )  # (BLOCK_G, BLOCK_DQK); padding rows are zeros and are never stored
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    # Each K/V tile is loaded once for the whole GQA group (that is the point of grouping).
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        n_valid = cols < hi
        k = tl.load(
            k_base + cols[:, None] * stride_ks + offs_dqk[None, :] * stride_kd,
            mask=n_valid[:, None] & (offs_dqk[None, :] < D_QK), other=0.0,
        )  # (BLOCK_N, BLOCK_DQK)
        v = tl.load(
            v_base + cols[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
            mask=n_valid[:, None] & (offs_dv[None, :] < D_V), other=0.0,
        )  # (BLOCK_N, BLOCK_DV)
        m_i, l_i, acc = _attend_tile(q, k, v, n_valid, m_i, l_i, acc, qk_scale, DOT_IEEE, DOT_UPCAST)

    _store_split(O_PART, LSE_PART, b, heads, split, m_i, l_i, acc, g_valid, offs_dv, D_V,
                 stride_pb, stride_ph, stride_ps, stride_lb, stride_lh)


@triton.jit
def _merge_splits_kernel(
    O_PART, LSE_PART, O,
    stride_pb, stride_ph, stride_ps,  # O_PART (B, H, splits, D), last dim contiguous
    stride_lb, stride_lh,  # LSE_PART (B, H, splits)
    stride_ob, stride_oh, stride_od,  # O (B, H, D)
    NUM_SPLITS, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < NUM_SPLITS

    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + offs_s, mask=s_valid, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (kv_len == 0): output zeros, not NaN
    w = tl.exp2(lse - m)  # (BLOCK_S,), 0 for empty splits; the largest is 1
    part = tl.load(
        O_PART + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=s_valid[:, None] & (offs_d[None, :] < D), other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    denom = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty), mask=offs_d < D)


def merge_splits(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Stage 2: out[b, h] = sum_s exp2(lse_s) * o_part[b, h, s] / sum_s exp2(lse_s) (base-2 lse).

    o_part (B, H, splits, D) fp32, lse_part (B, H, splits) fp32, out (B, H, D) any dtype/strides.
    """
    B, H, NS, D = o_part.shape
    assert o_part.stride(-1) == 1 and lse_part.stride(-1) == 1
    _merge_splits_kernel[(B, H)](
        o_part, lse_part, out,
        *o_part.stride()[:3], *lse_part.stride()[:2], *out.stride(),
        NS, D,
        BLOCK_S=max(2, triton.next_power_of_2(NS)),  # >= 2 so no block is 1 wide
        BLOCK_D=block_dim(D),
        num_warps=4 if D > 128 else 2,
    )
    return out


def pick_num_splits(max_len: int, programs: int, device: torch.device, min_keys_per_split: int = 256) -> int:
    """Splits per sequence for `programs` (b, head group) programs over `max_len` keys.

    Enough programs for ~2 waves over the GPU's SMs, but each split keeps >= 256 keys so the
    extra work (partial outputs, merge) stays small next to the K/V reads; at most 64.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2  # interpreter: one program at a time, few splits is fastest
    want = math.ceil(2 * sms / max(programs, 1))
    cap = max(1, math.ceil(max_len / min_keys_per_split))
    return int(max(1, min(want, cap, 64)))


def _decode_config(q: torch.Tensor, d_qk_pad: int, d_v_pad: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages)."""
    if is_interpreted(q):
        return 16, 4, 1  # small tiles: tiny test lengths still span several tiles and splits
    # 64 keys x 128 dims x 2 B = 16 KB per K (or V) tile; halve the tile for wide or fp32 heads.
    width = max(d_qk_pad, d_v_pad) * q.element_size()
    return (64 if width <= 256 else 32), 4, 2


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """One decode step of attention over the KV cache -> (B, H, Dv).

    num_splits=None picks it from max(kv_len) (one device->host sync: pass num_splits to avoid
    it, e.g. under CUDA graphs). Any num_splits is correct; it only changes the work split.
    """
    require_triton()
    B, H, D_QK = q.shape
    Bk, S, HKV, D_QK_K = k_cache.shape
    D_V = v_cache.shape[-1]
    assert Bk >= B and D_QK_K == D_QK, (q.shape, k_cache.shape)
    assert v_cache.shape[:3] == k_cache.shape[:3], (k_cache.shape, v_cache.shape)
    assert H % HKV == 0, f"query heads {H} not a multiple of kv heads {HKV}"
    assert kv_len.shape == (B,), kv_len.shape
    check_same_device(q, k_cache, v_cache, kv_len)
    kv_len = kv_len.to(torch.int32)

    o = torch.empty((B, H, D_V), dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    group = H // HKV
    BLOCK_DQK, BLOCK_DV = block_dim(D_QK), block_dim(D_V)
    bn, num_warps, num_stages = _decode_config(q, BLOCK_DQK, BLOCK_DV)
    bn = block_n or bn
    if num_splits is None:
        num_splits = pick_num_splits(min(int(kv_len.max()), S), B * HKV, q.device)

    # fp32 workspace: per-split normalised outputs and their base-2 log-sum-exp.
    o_part = torch.empty((B, H, num_splits, D_V), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, HKV, num_splits)](
        q, k_cache, v_cache, kv_len, o_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *o_part.stride()[:3], *lse_part.stride()[:2],
        D_QK, D_V,
        float(scale) * LOG2E,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=bn, BLOCK_DQK=BLOCK_DQK, BLOCK_DV=BLOCK_DV,
        DOT_IEEE=dot_ieee(q), DOT_UPCAST=dot_upcast(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return merge_splits(o_part, lse_part, o)


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
    num_splits: int | None = None,  # accepted for signature parity; the reference does not split
) -> torch.Tensor:
    """Torch reference: SDPA in fp32 with the boolean mask j < kv_len[b]."""
    B, H, _ = q.shape
    HKV = k_cache.shape[2]
    k = k_cache[:B].float().transpose(1, 2).repeat_interleave(H // HKV, dim=1)  # (B, H, S, Dqk)
    v = v_cache[:B].float().transpose(1, 2).repeat_interleave(H // HKV, dim=1)  # (B, H, S, Dv)
    S = k.shape[2]
    mask = torch.arange(S, device=q.device)[None, :] < kv_len.to(q.device).long()[:, None]  # (B, S)
    o = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scale)
    return o[:, :, 0].to(q.dtype)  # (B, H, Dv)

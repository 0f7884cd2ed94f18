"""Triton attention kernels of minillm, each next to the torch reference it must match.

    prefill_attention(q, k_cache, v_cache, start, scale)              FlashAttention-2 over the cache
    decode_attention(q, k_cache, v_cache, kv_len, scale, num_splits)  flash-decoding (split-K)
    mla_decode(q_latent, q_pe, c_kv, k_pe, kv_len, scale)            MLA decode on the latent cache
    paged_decode_attention(q, k_pool, v_pool, block_table, kv_len,   flash-decoding through a block
                           block_size, scale)                        table (the engine's paged pool)
    quant_gemv(x, q, d, m)                                            int8/int4 weight-only product, few rows

Importing this package never needs triton: the references are plain torch, and the
launchers raise a clear error if called without it. `triton_available()` tells whether the
kernels can run here (CUDA, or CPU tensors under TRITON_INTERPRET=1).
"""

from ._common import triton_available
from .decode import decode_attention, decode_attention_ref
from .mla_decode import mla_decode, mla_decode_ref
from .paged_decode import paged_decode_attention, paged_decode_attention_ref
from .prefill import prefill_attention, prefill_attention_ref
from .quant_gemv import quant_gemv, quant_gemv_ref

__all__ = [
    "triton_available",
    "prefill_attention",
    "prefill_attention_ref",
    "decode_attention",
    "decode_attention_ref",
    "mla_decode",
    "mla_decode_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "quant_gemv",
    "quant_gemv_ref",
]

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

import importlib

# name -> the module defining it, imported on first use (PEP 562): the CPU kernels' modules
# (cpu_gemv, cpu_decode, cpu_step) need no triton, and importing it costs ~0.3 s of a cold start
# on a machine that will never launch a Triton kernel
_WHERE = {"triton_available": "_common", "prefill_attention": "prefill", "prefill_attention_ref": "prefill",
          "decode_attention": "decode", "decode_attention_ref": "decode", "mla_decode": "mla_decode",
          "mla_decode_ref": "mla_decode", "paged_decode_attention": "paged_decode",
          "paged_decode_attention_ref": "paged_decode", "quant_gemv": "weight_only", "quant_gemv_ref": "weight_only"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value          # after the import, which set the submodule of the same name
    return value


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

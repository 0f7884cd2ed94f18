"""The whole CPU decode step in one call (cpu_step.c): its ctypes description and launcher.

minillm/decode_step.py fills these structures from a Decoder (its weights stay where they are:
only pointers are kept) and calls `decode_step` once per token. The reference it must equal is the
eager Decoder itself (a kernel may not import the model: tests/test_decode_step.py compares them).

    weight(kind, q, N, K, G=K, d=None, m=None, round_x=False)   one product's Weight
    decode_step(model, x, cos, sin, k, v, kv_stride, write_rows, rows, lens, logits)
        x (M, C) fp32 in (the embeddings) and out; cos, sin (M, D) fp32 or None; k, v: layer 0's
        cache rows (rows, Hkv, D), fp32 or bf16, layer l at + l * kv_stride elements; write_rows
        (M,), rows (M, S), lens (M,) int64; logits (M, V) fp32, written
"""
from __future__ import annotations

import ctypes

import torch

from .cpu_gemv import MAX_ROWS, _lib  # noqa: F401  (MAX_ROWS: what decode_step is meant for)

W_F32, W_BF16, W_INT8, W_INT4 = range(4)   # cpu_common.h
_p, _L, _i, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class Weight(ctypes.Structure):
    _fields_ = [("kind", _i), ("round_x", _i), ("N", _L), ("K", _L), ("G", _L), ("q", _p), ("d", _p), ("m", _p)]


class Layer(ctypes.Structure):
    _fields_ = [("qkv", Weight), ("o", Weight), ("gate_up", Weight), ("down", Weight),
                ("attn_norm", _p), ("mlp_norm", _p), ("q_norm", _p), ("k_norm", _p)]


class Model(ctypes.Structure):
    _fields_ = [("layers", _i), ("H", _i), ("Hkv", _i), ("D", _i), ("C", _i), ("I", _i), ("bf16", _i),
                ("kv_bf16", _i), ("eps", _f), ("scale", _f), ("layer", ctypes.POINTER(Layer)), ("norm", _p),
                ("head", Weight)]


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def weight(kind: int, q: torch.Tensor, N: int, K: int, G: int | None = None, d=None, m=None,
           round_x: bool = False) -> Weight:
    assert q.is_contiguous() and K % 32 == 0 and (d is None or d.is_contiguous()) and (m is None or m.is_contiguous())
    return Weight(kind, int(round_x), N, K, G or K, ptr(q), ptr(d), ptr(m))


def decode_step(model: Model, x, cos, sin, k, v, kv_stride: int, write_rows, rows, lens, logits):
    M = x.shape[0]
    for t in (x, logits):
        assert t.dtype is torch.float32 and t.is_contiguous()
    for t in (write_rows, rows, lens):
        assert t.dtype is torch.int64 and t.is_contiguous()
    assert rows.shape[0] == write_rows.shape[0] == lens.shape[0] == M and logits.shape == (M, model.head.N)
    _lib().decode_step(ctypes.addressof(model), M, x.data_ptr(), ptr(cos), ptr(sin), k.data_ptr(), v.data_ptr(),
                       kv_stride, write_rows.data_ptr(), rows.data_ptr(), rows.shape[1], lens.data_ptr(),
                       logits.data_ptr(), torch.get_num_threads())
    return logits

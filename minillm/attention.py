"""Where attention runs: the seam between the decoder and its kernels.

The decoder hands every layer the same `Step`: the positions of the new tokens, the cache and the
run settings (backend, MLA absorption). `Step.attend` writes the new K/V into the cache and runs attention over everything the
sequence has so far. The torch backend uses scaled_dot_product_attention; the triton backend calls
minillm.kernels (FlashAttention-2 prefill, flash-decoding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import KVCache
from .config import RunSettings
from .cpu import upcast_bf16
from .kernels import cpu_decode


class Step:
    """One forward pass. `start` is the position of each sequence's first new token: an int when
    all sequences share it (the common case: one prompt, or decoding prompts of equal length), else
    a (B,) LongTensor. Query t of sequence b sits at position start[b] + t and sees keys 0..that."""

    def __init__(self, batch: int, T: int, start, cache: KVCache | None, run: RunSettings, device):
        self.T, self.cache, self.backend, self.absorb = T, cache, run.backend, run.mla_absorb
        if isinstance(start, torch.Tensor):
            start = start.to(device)
            self.uniform = False
            self.start_t = start
            self.kv_len = int(start.max()) + T
        else:
            self.uniform = True
            self.start_t = torch.full((batch,), start, dtype=torch.long, device=device)
            self.kv_len = start + T
        self.start = start
        self.pos = self.start_t[:, None] + torch.arange(T, device=device)   # (B, T)
        self.batch_idx = torch.arange(batch, device=device)[:, None]
        self._mask = None
        self._rows = None
        # one new token per sequence over an fp32/bf16 cache, on CPU: attend_qkv (kernels/cpu_decode.c)
        self.cpu_decode = T == 1 and cache is not None and run.backend == "torch" and \
            torch.device(device).type == "cpu" and cpu_kv(cache) and cpu_decode.available()
        self._rope = None

    def write(self, layer: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store the new tokens' entries (each (B, T, ...)) in the cache; return every entry up to
        the longest sequence's end, (B, S, ...). Without a cache, the new entries themselves."""
        if self.cache is None:
            return new
        slots = self.cache.layer(layer)
        for name, x in new.items():
            if self.uniform:
                slots[name][:, self.start:self.start + self.T] = x
            else:
                slots[name][self.batch_idx, self.pos] = x
        return {name: t[:, :self.kv_len] for name, t in slots.items()}

    def mask(self) -> torch.Tensor:
        """(B, 1, T, S) bool: key j is visible to query t iff j <= pos[b, t]."""
        if self._mask is None:
            keys = torch.arange(self.kv_len, device=self.pos.device)
            self._mask = (keys[None, None, :] <= self.pos[:, :, None])[:, None]
        return self._mask

    def attention(self, layer: int, new: dict[str, torch.Tensor], queries: tuple, fn) -> torch.Tensor:
        """Store `new` (the new tokens' cache entries) and return fn(*queries, kv, step), kv being
        everything the sequences have so far. The paged engine's step (engine/paged.py) overrides
        this to split one flat batch into groups, each with K/V gathered from its block tables."""
        return fn(*queries, self.write(layer, **new), self)

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q (B, T, H, D), k (B, T, Hkv, D), v (B, T, Hkv, Dv) -> (B, T, H, Dv)."""
        def fn(q, kv, step):
            attend = triton_attention if step.backend == "triton" else sdpa
            return attend(q, kv["k"], kv["v"], scale, step)
        return self.attention(layer, dict(k=k, v=v), (q,), fn)

    def decode_rows(self, layer: int):
        """For attend_qkv: the layer's k and v cache as (rows, Hkv, D) tensors, the rows the new
        tokens go to (B,), the rows each sequence reads (B, S) and its length (B,). Here row
        b * max_len + position; the rows are the same for every layer, made once."""
        kv = {name: t.flatten(0, 1) for name, t in self.cache.layer(layer).items()}
        if self._rows is None:
            base = torch.arange(self.cache.batch)[:, None] * self.cache.max_len
            self._rows = (base[:, 0] + self.start_t, base + torch.arange(self.kv_len), self.start_t + 1)
        return (kv["k"], kv["v"], *self._rows)

    def attend_qkv(self, layer: int, qkv, rope, heads: tuple[int, int, int], norms: tuple, eps: float,
                   scale: float) -> torch.Tensor:
        """Decode on CPU (self.cpu_decode): what Attention.forward does after its qkv product, in
        two calls instead of ~30 small ops: qkv_store (q/k norms, rotary, the cache write) and
        attend_decode. qkv (B, 1, (H + 2 Hkv) D) -> (B, 1, H D) (the engine's flat batch: (1, B, ...));
        norms: (q_norm, k_norm) weights or Nones."""
        H, Hkv, D = heads
        n = qkv.numel() // qkv.shape[-1]                               # one new token per sequence
        x = cpu_decode.f32(qkv.reshape(n, -1))                        # (n, (H + 2 Hkv) D) fp32
        if rope is not None and self._rope is None:                    # (n, D) fp32, once a step
            self._rope = tuple(cpu_decode.f32(t.reshape(n, D)) for t in rope)
        cos, sin = self._rope or (None, None)
        k, v, write, read, lens = self.decode_rows(layer)
        norms = tuple(w if w is None else cpu_decode.f32(w) for w in norms)
        cpu_decode.qkv_store(x, H, Hkv, cos, sin, k, v, write, *norms, eps)
        o = cpu_decode.attend_decode(x.view(n, -1, D)[:, :H], k, v, read, lens, scale)   # (n, H, D)
        o = o.view(*qkv.shape[:-1], H * D)
        return o if qkv.dtype is torch.float32 else o.to(qkv.dtype)


def cpu_kv(cache) -> bool:
    """Whether the CPU decode kernels read this cache (KVCache or the engine's PagedKV): fp32/bf16."""
    return all(t.dtype in (torch.float32, torch.bfloat16) for t in cache.tensors.values())


def cpu_decoding(q: torch.Tensor, step: Step | None = None) -> bool:
    """One new token per sequence over a cache, on CPU (step None: whether that could run here):
    kernels/cpu_decode.c attends in one call. SDPA's CPU kernel, built for blocks of queries, costs
    ~25 us a layer there, and a paged pool needs a gather first; this reads the cache rows in place."""
    if not (q.is_cpu and q.dtype in (torch.float32, torch.bfloat16) and cpu_decode.available()):
        return False
    return step is None or step.cpu_decode


def cpu_attention(q, k, v, rows, lens, scale) -> torch.Tensor:
    """q (B, 1, H, D); k, v: (rows, Hkv, D) pools; rows (B, S) -> (B, 1, H, Dv)."""
    o = cpu_decode.attend_decode(cpu_decode.f32(q[:, 0]), k, v, rows, lens, scale)   # (B, H, Dv)
    return o[:, None].to(q.dtype)


def triton_attention(q, k, v, scale, step: Step) -> torch.Tensor:
    from minillm import kernels
    if step.T == 1 and step.cache is not None:   # decoding: flash-decoding over the cache
        return kernels.decode_attention(q[:, 0], k, v, step.start_t + 1, scale)[:, None]
    return kernels.prefill_attention(q, k, v, step.start_t, scale)   # FlashAttention-2


def sdpa(q, k, v, scale, step: Step) -> torch.Tensor:
    dtype = q.dtype
    if q.device.type == "cpu" and dtype != torch.float32 and (step.T == 1 or upcast_bf16()):
        # one query per sequence: torch's CPU flash kernel runs ~5x slower in bf16/fp16 than in
        # fp32 here (it is built for blocks of queries), and the K/V rows are few: upcast them.
        # A prompt on a CPU without AMX (cpu.upcast_bf16, as its products): fp32 ~1.4x faster
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # (B, H, T|S, D)
    gqa = q.shape[1] != k.shape[1]
    if step.uniform and step.start == 0:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=step.T > 1, scale=scale, enable_gqa=gqa)
    elif step.uniform and step.T == 1:   # decoding: the one new token sees the whole cache, so the
        # G query heads sharing a kv head can stand in for G query positions: one unmasked
        # (B, Hkv, G, D) x (B, Hkv, S, D) attention, no GQA broadcast (~1.5x faster on CPU)
        B, H, _, D = q.shape
        o = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, D), k, v, scale=scale)
        o = o.reshape(B, H, 1, -1)                                           # (B, H, 1, Dv)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask(), scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2).to(dtype)                                       # (B, T, H, Dv)

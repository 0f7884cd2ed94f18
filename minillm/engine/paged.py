"""The paged KV cache and the Step that attends over block tables.

The pool holds, per cache entry (k and v; MLA: c_kv and k_pe), one (layers, blocks * block_size,
*shape) tensor: slot s of block b is row b * block_size + s. A step runs every scheduled token of
every sequence as one flat batch, ids (1, N): the linear layers and MLPs see no padding, whatever
the mix of prefill chunks and decodes. Attention is where sequences differ, so PagedStep splits
there: all one-token sequences form one group (a decode batch, each row masked to its length) and
each longer chunk is a group of its own; each group's K/V is gathered from its block tables into
the (B, S, ...) layout that the contiguous cache gives, and handed to the same attention code
(SDPA, MLA's latent attention, the Triton kernels), so the numbers are computed as before. On
backend "triton" the decode group of MHA/GQA layers skips the gather: kernels/paged_decode.py reads
the pool through the block tables (MLA's decode still gathers its latent).
"""
from __future__ import annotations

import mmap

import torch

from ..attention import Step, cpu_attention, cpu_decoding, sdpa, triton_attention
from ..config import RunSettings


class PagedKV:
    def __init__(self, shapes: dict[str, tuple[int, ...]], num_layers: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device):
        # zeros, as KVCache: masked slots must not hold NaN (0 * NaN = NaN in p @ V)
        self.tensors = {name: _zeros((num_layers, num_blocks * block_size, *shape), dtype, device)
                        for name, shape in shapes.items()}
        self.num_blocks, self.block_size = num_blocks, block_size

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        return {name: t[i] for name, t in self.tensors.items()}   # each (slots, *shape)

    @staticmethod
    def bytes_per_block(shapes, num_layers: int, block_size: int, dtype: torch.dtype) -> int:
        per_token = sum(torch.Size(s).numel() for s in shapes.values()) * num_layers
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def _zeros(shape, dtype, device) -> torch.Tensor:
    """torch.zeros, but on CPU anonymous memory from mmap: zero by the kernel's promise, page by page
    as it is first touched. The default pool is 1 GiB; writing its zeros up front took ~0.45 s,
    an eighth of a cold start, for blocks a short run never uses."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=dtype, count=torch.Size(shape).numel()).view(shape)


class PagedStep(Step):
    """One engine step over `parts`: (block table, start, n) per sequence: its n new tokens sit at
    positions start .. start + n - 1 and see keys 0 .. their own position."""

    def __init__(self, parts: list[tuple[list[int], int, int]], cache: PagedKV, run: RunSettings, device):
        bs = cache.block_size
        self.cache, self.backend, self.absorb = cache, run.backend, run.mla_absorb
        self.T, self.uniform = sum(n for _, _, n in parts), False
        self._rope = None
        # positions, pool rows and offsets in Python ints, then one tensor each: a decode step is
        # ~100 us of small tensor ops otherwise, per token
        pos = [p for _, start, n in parts for p in range(start, start + n)]
        self.pos = torch.tensor([pos], device=device)                                         # (1, N)
        self.slots = torch.tensor([b[p // bs] * bs + p % bs for b, start, n in parts        # (N,) pool rows
                                   for p in range(start, start + n)], device=device)
        self.groups = []   # (flat indices (B*T,), sub-step of B sequences x T tokens, gather (B, S))
        offsets = [0]
        for _, _, n in parts:
            offsets.append(offsets[-1] + n)
        ones = [i for i, (_, _, n) in enumerate(parts) if n == 1]
        if ones:
            starts = [parts[i][1] for i in ones]
            gather = _gather([parts[i][0] for i in ones], max(starts) + 1, bs)
            # equal lengths (one sequence, always): an int start, so attention takes the unmasked
            # decode path (attention.sdpa: GQA heads as query rows), as the contiguous loop does
            same = all(st == starts[0] for st in starts)
            step = Step(len(ones), 1, starts[0] if same else torch.tensor(starts), cache, run, device)
            nb = max(len(parts[i][0]) for i in ones)
            step.table = torch.tensor([parts[i][0] + [0] * (nb - len(parts[i][0])) for i in ones], device=device)
            step.pool_rows = gather if isinstance(gather, torch.Tensor) else torch.arange(gather.start, gather.stop)[None]
            self.groups.append((torch.tensor([offsets[i] for i in ones], device=device), step, _to(gather, device)))
        # every sequence decoding one token, on CPU: Attention takes Step.attend_qkv (decode_rows below)
        self.cpu_decode = len(ones) == len(parts) and self.groups[0][1].cpu_decode
        for i, (blocks, start, n) in enumerate(parts):
            if n > 1:
                self.groups.append((torch.arange(offsets[i], offsets[i] + n, device=device),
                                    Step(1, n, start, cache, run, device), _to(_gather([blocks], start + n, bs), device)))

    def decode_rows(self, layer):
        """Step.decode_rows over the pool: the new tokens' slots, the decode group's rows."""
        pool, (_, step, _) = self.cache.layer(layer), self.groups[0]
        return pool["k"], pool["v"], self.slots, step.pool_rows, step.start_t + 1

    def attention(self, layer, new, queries, fn, gather_decode=True):
        pool = self.cache.layer(layer)
        for name, x in new.items():                                # x (1, N, *shape)
            pool[name][self.slots] = x[0]
        out = None
        for idx, step, gather in self.groups:
            B, T = step.pos.shape
            skip = T == 1 and not gather_decode                    # fn reads the pool itself
            kv = None if skip else {name: t[gather] if isinstance(gather, torch.Tensor) else t[None, gather]
                                    for name, t in pool.items()}          # (B, S, *shape)
            o = fn(*(q[0, idx].view(B, T, *q.shape[2:]) for q in queries), kv, step)   # (B, T, H, Dv)
            if out is None:
                out = o.new_empty(1, self.T, *o.shape[2:])
            out[0, idx] = o.reshape(B * T, *o.shape[2:])
        return out

    def attend(self, layer, q, k, v, scale):
        if self.backend != "triton":
            def fn(q, kv, step):
                if cpu_decoding(q, step):   # the decode group: the CPU kernel reads the pool rows in place
                    pool = self.cache.layer(layer)
                    return cpu_attention(q, pool["k"], pool["v"], step.pool_rows, step.start_t + 1, scale)
                return sdpa(q, kv["k"], kv["v"], scale, step)
            return self.attention(layer, dict(k=k, v=v), (q,), fn, gather_decode=not cpu_decoding(q))
        from minillm import kernels
        bs = self.cache.block_size

        def fn(q, kv, step):
            if step.T == 1:   # the decode group: the paged kernel reads K/V through the block tables
                pool = self.cache.layer(layer)
                return kernels.paged_decode_attention(q[:, 0], pool["k"], pool["v"], step.table, step.start_t + 1,
                                                      bs, scale)[:, None]
            return triton_attention(q, kv["k"], kv["v"], scale, step)
        return self.attention(layer, dict(k=k, v=v), (q,), fn, gather_decode=False)


def _gather(tables: list[list[int]], S: int, bs: int) -> torch.Tensor | slice:
    """(B, S) pool rows of positions 0..S-1 of each sequence; past a table's end, row 0 (masked).
    One sequence whose blocks follow each other in the pool (a lone request on a fresh pool, the
    common case at batch 1): a slice of rows, which reads the pool in place instead of copying it."""
    used = -(-S // bs)
    if len(tables) == 1 and len(tables[0]) >= used and tables[0][:used] == list(range(tables[0][0], tables[0][0] + used)):
        return slice(tables[0][0] * bs, tables[0][0] * bs + S)
    pos = torch.arange(S)
    out = torch.zeros(len(tables), S, dtype=torch.long)
    for b, blocks in enumerate(tables):
        n = min(S, len(blocks) * bs)
        out[b, :n] = torch.tensor(blocks, dtype=torch.long)[pos[:n] // bs] * bs + pos[:n] % bs
    return out


def _to(gather, device):
    return gather.to(device) if isinstance(gather, torch.Tensor) else gather

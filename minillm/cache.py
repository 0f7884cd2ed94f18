"""The KV cache: preallocated once per generation call, written in place, never concatenated.

Each attention kind says what it keeps per token (MHA/GQA: K and V per kv head; MLA: one latent
and one shared rotary key), and the cache holds one (layers, batch, max_len, *shape) tensor per
entry. Where a sequence is (its length) is the caller's business: the decoder is given the
position of each sequence's first new token and writes there.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, shapes: dict[str, tuple[int, ...]], num_layers: int, batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        # zeros, not empty: slots past a sequence's end are masked out of the scores, but a NaN
        # left there by uninitialised memory would still poison p @ V (0 * NaN = NaN)
        self.tensors = {name: torch.zeros(num_layers, batch, max_len, *shape, dtype=dtype, device=device)
                        for name, shape in shapes.items()}
        self.batch, self.max_len = batch, max_len

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        return {name: t[i] for name, t in self.tensors.items()}   # each (B, S, *shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

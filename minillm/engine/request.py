"""A request to the engine: its prompt, its own sampling settings, and its progress."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from ..generate import Sampling, Sequence

_ids = itertools.count()


@dataclass
class SamplingParams(Sampling):
    """Sampling (temperature, top_k, top_p, min_p, repetition_penalty) plus what ends a request.
    `eos` None: the engine's eos ids (the model's); an empty set: never stop at eos."""
    max_tokens: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos: set[int] | None = None
    logprobs: int | None = None     # keep each new token's log-probability and this many top ones

    def __post_init__(self):
        super().__post_init__()
        if self.logprobs is not None and self.logprobs < 0:
            raise UsageError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.max_tokens < 0:
            raise UsageError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return not self.temperature and not (self.repetition_penalty and self.repetition_penalty != 1.0)


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    seq: Sequence                             # new tokens, their text, stop strings, finish_reason
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    listener: object = None                   # called with the request after each step it advanced
    computed: int = 0                         # tokens whose K/V sit in the cache
    blocks: list[int] = field(default_factory=list)   # the block table: block ids in order
    hashed: int = 0                           # leading blocks registered in the prefix cache
    prefix_key: int | None = None             # the key of block hashed - 1 (blocks.chain)
    cached_tokens: int = 0                    # prompt tokens found in the prefix cache (last admission)
    generator: torch.Generator | None = None  # its own: its samples do not depend on the batch
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    preemptions: int = 0
    allowed: list[int] | None = None          # token healing: the ids the first new token may be
    logprobs: list = field(default_factory=list)   # per new token: (its logprob, [(id, logprob)] top ones)

    @property
    def tokens(self) -> list[int]:
        """Everything the model has seen or will see next: prompt, then the tokens generated."""
        return self.prompt + self.seq.tokens

    @property
    def finished(self) -> bool:
        return self.seq.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived

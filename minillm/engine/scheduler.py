"""Continuous batching: which requests run this step, and how many of their tokens.

Every step has a token budget. Running requests go first, oldest first, each with what it has
left to compute: one token when decoding, the rest of its prompt (or as much as the budget
allows: chunked prefill) otherwise. Then waiting requests are admitted, oldest first, while the
budget, max_running and the free blocks allow; a new request first takes whatever prefix of its
tokens the prefix cache holds, and computes only the rest. When a running request needs a block
and none is free, the newest running request is preempted: its blocks are released (its full
blocks stay in the prefix cache) and it waits at the front of the queue, to be recomputed from its
prompt and the tokens it has generated, which it keeps. The oldest request always advances, and
Engine.add refuses a request that could not fit the pool alone, so every request finishes.
"""
from __future__ import annotations

from collections import deque

from .blocks import BlockPool
from .request import Request


class Scheduler:
    def __init__(self, pool: BlockPool, max_running: int, max_step_tokens: int):
        self.pool, self.max_running, self.max_step_tokens = pool, max_running, max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []     # in order of admission
        self.preemptions = self.hit_tokens = 0

    def schedule(self) -> list[tuple[Request, int]]:
        """-> (request, tokens to compute) for this step; the requests' blocks cover them."""
        budget, out, preempted = self.max_step_tokens, [], self.preemptions
        for r in list(self.running):
            if not budget or r not in self.running:   # preempted by an older one just now
                break
            n = min(len(r.tokens) - r.computed, budget)
            while not self._grow(r, r.computed + n):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is r:
                    break
            else:
                out.append((r, n))
                budget -= n
        # after a preemption, admit no one: the blocks are short, and a newcomer would be next to go
        while self.waiting and budget and len(self.running) < self.max_running and preempted == self.preemptions:
            r = self.waiting[0]
            tokens = r.tokens
            r.blocks = self.pool.match(tokens)
            r.computed = r.hashed = len(r.blocks)
            r.computed *= self.pool.block_size
            n = min(len(tokens) - r.computed, budget)
            if not self._grow(r, r.computed + n):
                self._reset(r)
                break
            if not r.preemptions:
                r.cached_tokens = r.computed
            self.hit_tokens += r.computed
            r.prefix_key = self.pool.key[r.blocks[r.hashed - 1]] if r.hashed else None
            self.running.append(self.waiting.popleft())
            out.append((r, n))
            budget -= n
        return out

    def _grow(self, r: Request, tokens: int) -> bool:
        need = -(-tokens // self.pool.block_size) - len(r.blocks)
        if need <= 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            return False
        r.blocks += got
        return True

    def _reset(self, r: Request):
        self.pool.release(r.blocks)
        r.blocks, r.computed, r.hashed, r.prefix_key = [], 0, 0, None

    def preempt(self, r: Request):
        self.running.remove(r)
        self._reset(r)
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def finish(self, r: Request):
        """Off the queues, blocks released (those keyed stay cached)."""
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        self._reset(r)

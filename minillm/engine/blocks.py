"""The block pool: which KV blocks are in use, by how many sequences, and which hold a known prefix.

A block holds `block_size` consecutive tokens of one sequence; a sequence's block table lists its
blocks in order. A full block is keyed by a hash chained over blocks, hash((previous block's key,
*its token ids)), so a key names the block's tokens *and everything before them* (nano-vllm and
vLLM chain their hashes the same way); the tokens are kept too, so a hash collision is a miss,
never someone else's K/V. Freed blocks keep their key and contents: they are reused by a later
request that shares the prefix, or given out (least recently freed first) when a new block is
needed, at which point their key is forgotten.
"""
from __future__ import annotations

from collections import OrderedDict


def chain(prev: int | None, tokens: list[int]) -> int:
    # Python's hash of a tuple of ints is deterministic (no per-process salt, unlike str)
    return hash((prev, *tokens))


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.key: list[int | None] = [None] * num_blocks          # block -> its prefix key
        self.block_tokens: list[tuple | None] = [None] * num_blocks
        self.by_key: dict[int, int] = {}                           # prefix key -> block
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.by_key)

    def match(self, tokens: list[int]) -> list[int]:
        """The cached blocks that hold a prefix of `tokens`, taken (ref counted) for a new sequence.
        The last token is never matched: its logits are needed, so it must be computed."""
        bs, out, prev = self.block_size, [], None
        for i in range((len(tokens) - 1) // bs):
            part = tokens[i * bs:(i + 1) * bs]
            prev = chain(prev, part)
            b = self.by_key.get(prev)
            if b is None or self.block_tokens[b] != tuple(part):
                break
            self.take(b)
            out.append(b)
        return out

    def take(self, b: int):
        if self.refs[b] == 0:
            del self.free[b]
        self.refs[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (evicting the least recently freed cached ones), or None if too few."""
        if n > len(self.free):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            if self.key[b] is not None:                   # evict its prefix
                del self.by_key[self.key[b]]
                self.key[b] = self.block_tokens[b] = None
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]):
        """A sequence lets go of its blocks; the tail goes first, so that a prefix outlives its
        continuations when blocks are reclaimed."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free[b] = None

    def register(self, blocks: list[int], tokens: list[int], n: int, prev: int | None):
        """Key the full blocks from blocks[n] on (their tokens computed); prev: blocks[n - 1]'s key.
        -> (blocks keyed, the last one's key): the caller keeps them to go on from there. A block
        whose prefix another block holds already stays unkeyed (two requests computed it at once)."""
        bs = self.block_size
        while n < len(blocks) and (n + 1) * bs <= len(tokens):
            part = tokens[n * bs:(n + 1) * bs]
            prev = chain(prev, part)
            b = blocks[n]
            if self.key[b] is None and prev not in self.by_key:
                self.key[b], self.block_tokens[b] = prev, tuple(part)
                self.by_key[prev] = b
            n += 1
        return n, prev

"""The systems bench measures, behind one interface: load, prefill, generate with a clock (and
llama.cpp in llamacpp.py). None may stop early: ours runs with no eos ids, transformers with
min_new_tokens = max_new_tokens, llama.cpp's generator never stops by itself. Prefill and decode are
timed apart the same way for all: the first new token's arrival splits a generate call in two.

Ours runs on the engine (minillm/engine), the path llm.generate and the server take, so its per-step
bookkeeping (scheduling, block tables, the paged KV gather, per-request sampling) is timed too. Each
timed call gets a fresh engine (prepare, before the clock starts): an empty prefix cache, else a
repeat would find its prompt cached and skip the prefill; and a step budget that holds the whole
batch's prompts, so every sequence's first token comes out of the same step (the engine's default
512 would chunk a batch of 8 x 128) and each later step gives every sequence one more token.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import hf


class Ours:
    name = "ours"

    def __init__(self, path, device, dtype, backend, quantize=None):
        from ..api import load
        # unquantized means dequantized, for a GGUF file too (load's default keeps its Q4/Q8 blocks)
        self.llm = load(path, device=device, dtype=dtype, backend=backend, quantize=quantize or "none")
        self.model, self.device = self.llm.model, self.llm.device

    def prepare(self, ids: torch.Tensor, new: int):
        """A fresh engine for the next call (untimed): KV blocks for exactly these sequences."""
        B, T = ids.shape
        bs = 16
        self.llm.new_engine(block_size=bs, num_blocks=B * -(-(T + new) // bs), max_running=max(64, B),
                            max_step_tokens=max(512, B * T))

    def _run(self, ids: torch.Tensor, new: int):
        from ..engine import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=new, eos=set())   # greedy, no eos: exactly `new`
        return self.llm.engine.run(ids.tolist(), params)

    def prefill(self, ids: torch.Tensor, new: int):
        """One engine step over the prompts: a forward into the paged cache, the last positions'
        logits, one greedy token each."""
        for _ in self._run(ids, 1):
            pass

    def generate(self, ids: torch.Tensor, new: int, clock: list):
        """Greedy, exactly `new` tokens through the engine; one clock reading per step, after its
        tokens are known (engine.run yields after each step)."""
        for reqs in self._run(ids, new):
            clock.append(time.perf_counter())
        if len(clock) != new or any(len(r.seq.tokens) != new for r in reqs):   # see the docstring
            raise RuntimeError(f"the engine took {len(clock)} steps for {new} tokens per sequence")


class Transformers:
    name = "transformers"

    def __init__(self, path, device, dtype, backend, quantize=None):   # transformers runs unquantized
        self.model = hf.load_reference(path, dtype, device, what="--compare transformers")
        if (Path(path) / "tokenizer.json").exists():   # minillm.load gives a tokenizer too: like for like
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device = torch.device(device)
        self.pad = self.model.generation_config.eos_token_id
        self.pad = self.pad[0] if isinstance(self.pad, list) else (self.pad if self.pad is not None else 0)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, new: int):
        from transformers import DynamicCache
        cache = {hf.cache_kwarg(self.model): DynamicCache(config=self.model.config)}
        return self.model(ids, use_cache=True, logits_to_keep=1, **cache).logits

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new: int, clock: list):
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):          # put() gets the prompt, then each step's new tokens
            def put(self, value):
                clock.append(time.perf_counter())

            def end(self):
                pass

        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                            min_new_tokens=new, do_sample=False, pad_token_id=self.pad, streamer=Clock())
        del clock[0]                        # the prompt's put(), before any work


from .llamacpp import LlamaCpp  # noqa: E402  (imports llama_cpp only when constructed)

SYSTEMS = {"ours": Ours, "transformers": Transformers, "llama.cpp": LlamaCpp}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(system, ids, new) -> tuple[float, float]:
    """-> (time to first token, decode tokens/s over the other new-1 steps, all sequences)."""
    clock: list[float] = []
    if hasattr(system, "prepare"):
        system.prepare(ids, new)
    sync(system.device)
    t0 = time.perf_counter()
    system.generate(ids, new, clock)
    sync(system.device)
    if len(clock) < new:
        raise RuntimeError(f"{system.name} produced {len(clock)} of {new} tokens")
    first, last = clock[0], clock[new - 1]
    return first - t0, ids.shape[0] * (new - 1) / (last - first)


def time_prefill(system, ids, new) -> float:
    if hasattr(system, "prepare"):
        system.prepare(ids, new)
    sync(system.device)
    t0 = time.perf_counter()
    system.prefill(ids, new)
    sync(system.device)
    return ids.numel() / (time.perf_counter() - t0)

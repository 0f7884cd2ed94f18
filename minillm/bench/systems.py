"""The two systems bench measures, behind one interface: load, prefill, generate with a clock.
Neither may stop early: ours runs with no eos ids, transformers with min_new_tokens = max_new_tokens.
Prefill and decode are timed apart the same way for both: the first new token's arrival splits a
generate call in two."""
from __future__ import annotations

import time

import torch

from .. import hf


class Ours:
    name = "ours"

    def __init__(self, path, device, dtype, backend, quantize=None):
        from ..api import load
        self.llm = load(path, device=device, dtype=dtype, backend=backend, quantize=quantize)
        self.model, self.device = self.llm.model, self.llm.device

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, new: int):
        """One forward over the prompts into a fresh cache, last position's logits only."""
        B, T = ids.shape
        cache = self.model.new_cache(B, T + new)
        return self.model(ids, 0, cache, last=torch.full((B,), T - 1, device=ids.device))

    def generate(self, ids: torch.Tensor, new: int, clock: list):
        """Greedy, exactly `new` tokens (no eos ids: nothing stops early); the loop the API runs."""
        from ..generate import Sampling, run
        for _ in run(self.model, None, ids.tolist(), new, Sampling(), set(), [], None):
            clock.append(time.perf_counter())   # one yield per step, after its tokens are known


class Transformers:
    name = "transformers"

    def __init__(self, path, device, dtype, backend, quantize=None):   # transformers runs unquantized
        self.model = hf.load_reference(path, dtype, device, what="--compare transformers")
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


SYSTEMS = {"ours": Ours, "transformers": Transformers}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(system, ids, new) -> tuple[float, float]:
    """-> (time to first token, decode tokens/s over the other new-1 steps, all sequences)."""
    clock: list[float] = []
    sync(system.device)
    t0 = time.perf_counter()
    system.generate(ids, new, clock)
    sync(system.device)
    if len(clock) < new:
        raise RuntimeError(f"{system.name} produced {len(clock)} of {new} tokens")
    first, last = clock[0], clock[new - 1]
    return first - t0, ids.shape[0] * (new - 1) / (last - first)


def time_prefill(system, ids, new) -> float:
    sync(system.device)
    t0 = time.perf_counter()
    system.prefill(ids, new)
    sync(system.device)
    return ids.numel() / (time.perf_counter() - t0)

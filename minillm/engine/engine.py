"""The engine: requests in, one batched forward per step, tokens out per request.

Thread use (a server): `add` and `abort` may be called from any thread; they go through an inbox
that the next `step` drains. `step` runs under a lock, so one thread (the server's loop, `serve`)
or several (a blocking `llm.generate` beside it) may drive it. Each request's `listener` is called
on the stepping thread after every step in which it advanced (a server forwards it to its event
loop with loop.call_soon_threadsafe).

Seeded sampling is reproducible whatever else is in the batch: each request draws from its own
torch.Generator (seeded from its seed, or at random), one row at a time, so its draws depend only
on its own logits and how many tokens it has drawn; preemption keeps the generator and the tokens.
"""
from __future__ import annotations

import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import UsageError
from ..generate import Heal, Sequence, argmax, next_tokens, only
from ..model import Decoder
from ..tokenizer import StreamDecoder
from .blocks import BlockPool
from .paged import PagedKV, PagedStep
from .request import Request, SamplingParams
from .scheduler import Scheduler


@dataclass
class EngineSettings:
    block_size: int = 16            # tokens per KV block
    num_blocks: int | None = None   # None: as many as kv_memory holds, at most max_running full contexts
    kv_memory: int = 1 << 30        # bytes for the KV pool when num_blocks is None
    max_running: int = 64           # requests in the running batch at once
    max_step_tokens: int = 512      # tokens computed per step (prefill is chunked to fit)

    def __post_init__(self):
        for name in ("block_size", "max_running", "max_step_tokens", "kv_memory"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise UsageError(f"num_blocks must be >= 1, got {self.num_blocks}")


class Engine:
    def __init__(self, model: Decoder, tokenizer=None, eos: set[int] = frozenset(),
                 settings: EngineSettings = EngineSettings()):
        self.model, self.tokenizer, self.eos, self.settings = model, tokenizer, set(eos), settings
        cfg, ref = model.cfg, model.norm.weight   # the activations' dtype and device (model.dtype)
        shapes = type(model.layers[0].attn).cache_shapes(cfg)
        bs = settings.block_size
        full = -(-cfg.max_position // bs)                   # blocks of one full-context sequence
        per_block = PagedKV.bytes_per_block(shapes, cfg.num_layers, bs, ref.dtype)
        n = settings.num_blocks or max(1, min(settings.max_running * full, settings.kv_memory // per_block))
        self.kv = PagedKV(shapes, cfg.num_layers, n, bs, ref.dtype, ref.device)
        self.pool = BlockPool(n, bs)
        self.scheduler = Scheduler(self.pool, settings.max_running, settings.max_step_tokens)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake, self.lock = threading.Event(), threading.RLock()
        self.counters = dict(prompt_tokens=0, computed_tokens=0, generated_tokens=0, requests_finished=0,
                             ttft_seconds_sum=0.0, ttft_count=0)

    # -- requests -----------------------------------------------------------------------------

    def add(self, prompt: list[int], params: SamplingParams | None = None, listener=None,
            request_id: str | None = None, heal: Heal | None = None) -> Request:
        """Queue a request (any thread); bad input is a UsageError (a ValueError) here, before
        anything runs. heal (generate.heal): `prompt` is heal.ids, the first token must extend heal.tail."""
        params = params or SamplingParams()
        cfg, bs = self.model.cfg, self.pool.block_size
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise UsageError("empty prompt: give at least one token")
        if len(prompt) > cfg.max_position:
            raise UsageError(f"prompt of {len(prompt)} tokens exceeds the model's context of {cfg.max_position}")
        bad = next((t for t in prompt if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise UsageError(f"token id {bad} is outside the vocabulary (0..{cfg.vocab_size - 1})")
        need = -(-min(len(prompt) + params.max_tokens, cfg.max_position) // bs)
        if need > self.pool.num_blocks:
            raise UsageError(f"a prompt of {len(prompt)} tokens with max_tokens={params.max_tokens} needs {need} KV "
                             f"blocks of {bs} tokens; the pool has {self.pool.num_blocks} (raise num_blocks or kv_memory: "
                             "llm.new_engine(kv_memory=BYTES))")
        decoder = StreamDecoder(self.tokenizer, heal.context if heal else ()) if self.tokenizer is not None else None
        r = Request(prompt, params, Sequence(prompt, decoder, list(params.stop), heal=heal.tail if heal else ""),
                    listener=listener, allowed=heal.allowed if heal else None)
        if request_id is not None:
            r.id = request_id
        if params.temperature:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            r.generator = torch.Generator(self.kv.tensors[next(iter(self.kv.tensors))].device).manual_seed(seed)
        if params.max_tokens == 0 or len(prompt) >= cfg.max_position:
            r.seq.finish("length")           # nothing to generate: done without a forward
            r.first_token_at = r.arrived
            self._notify([r])
            return r
        self.inbox.put(("add", r))
        self.wake.set()
        return r

    def abort(self, request_id: str):
        """Stop a request at the next step (any thread): finish_reason "abort", blocks released."""
        self.inbox.put(("abort", request_id))
        self.wake.set()

    def _drain(self):
        while True:
            try:
                what, x = self.inbox.get_nowait()
            except queue.Empty:
                return
            if what == "add":
                self.scheduler.waiting.append(x)
                self.counters["prompt_tokens"] += len(x.prompt)
                continue
            s = self.scheduler
            r = next((r for r in (*s.running, *s.waiting) if r.id == x), None)
            if r is not None:
                s.finish(r)
                r.seq.finish("abort")
                self._notify([r])

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or not self.inbox.empty())

    # -- one step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Schedule, run one forward over every scheduled token, sample; -> the requests that advanced."""
        with self.lock:
            self._drain()
            batch = self.scheduler.schedule()
            if not batch:
                return []
            device = self.model.device
            ids = torch.tensor([t for r, n in batch for t in r.tokens[r.computed:r.computed + n]], device=device)
            step = PagedStep([(r.blocks, r.computed, n) for r, n in batch], self.kv, self.model.run, device)
            ends = torch.tensor([n for _, n in batch]).cumsum(0) - 1
            done = [i for i, (r, n) in enumerate(batch) if r.computed + n == len(r.tokens)]
            logits = self.model(ids[None], step=step, last=ends[done].to(device))   # (len(done), V)
            self.counters["computed_tokens"] += len(ids)
            bs = self.pool.block_size
            for r, n in batch:
                r.computed += n
                if r.computed // bs > r.hashed:     # a block filled: key it for the prefix cache
                    r.hashed, r.prefix_key = self.pool.register(r.blocks, r.tokens[:r.computed], r.hashed, r.prefix_key)
            reqs = [batch[i][0] for i in done]
            self._sample(reqs, logits)
            self._notify([r for r, _ in batch])
            return [r for r, _ in batch]

    def _sample(self, reqs: list[Request], logits: torch.Tensor):
        for i, r in enumerate(reqs):
            if r.allowed is not None and not r.seq.tokens:   # token healing: the first token extends the tail
                logits[i] = only(logits[i], r.allowed)
        greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
        if len(greedy) == len(reqs):   # all greedy: no gather of the rows, no scatter (~0.15 ms a step on CPU)
            toks = argmax(logits)
        else:
            toks = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
            if greedy:
                toks[greedy] = argmax(logits[greedy])
        for i, r in enumerate(reqs):
            if not r.params.greedy:
                seen = torch.tensor([r.tokens], device=logits.device) if r.params.repetition_penalty else None
                toks[i] = next_tokens(logits[i:i + 1], r.params, seen, r.generator)[0]
        now, max_pos = time.perf_counter(), self.model.cfg.max_position
        for i, (r, t) in enumerate(zip(reqs, toks.tolist())):
            if r.params.logprobs is not None:   # of the model's distribution, before any sampling setting
                lp = logits[i].float().log_softmax(-1)
                top = lp.topk(r.params.logprobs) if r.params.logprobs else None
                r.logprobs.append((lp[t].item(), list(zip(top.indices.tolist(), top.values.tolist())) if top else []))
            r.seq.add(t, self.eos if r.params.eos is None else r.params.eos)
            self.counters["generated_tokens"] += 1
            if r.first_token_at is None:
                r.first_token_at = now
                self.counters["ttft_seconds_sum"] += r.ttft
                self.counters["ttft_count"] += 1
            if r.finished or len(r.seq.tokens) >= r.params.max_tokens or len(r.prompt) + len(r.seq.tokens) >= max_pos:
                r.seq.finish("length")        # keeps "eos" / "stop" if that is why it ended
                self.scheduler.finish(r)
                self.counters["requests_finished"] += 1

    def _notify(self, reqs):
        for r in reqs:
            if r.listener is not None:
                r.listener(r)

    # -- driving it -----------------------------------------------------------------------------

    def run(self, prompts: list[list[int]], params: SamplingParams, heals=None) -> Iterator[list[Request]]:
        """Add the prompts, step until all are finished, yielding them after each step (at least
        once). A caller that stops early (a broken stream) aborts what is unfinished."""
        reqs = [self.add(p, params, heal=h) for p, h in zip(prompts, heals or [None] * len(prompts))]
        try:
            yielded = False
            while not all(r.finished for r in reqs):
                self.step()
                yield reqs
                yielded = True
            if not yielded:
                yield reqs                    # all finished at add: still one answer
        finally:
            unfinished = [r for r in reqs if not r.finished]
            for r in unfinished:
                self.abort(r.id)
            if unfinished:
                with self.lock:
                    self._drain()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Request]:
        for reqs in self.run(prompts, params):
            pass
        return reqs

    def serve(self, stop: threading.Event):
        """A server's loop (on a thread of its own): step while there is work, else wait for some."""
        while not stop.is_set():
            if self.has_work:
                self.step()
            else:
                self.wake.wait(0.05)
                self.wake.clear()

    def metrics(self) -> dict:
        """What a server exports (/metrics): queue lengths, blocks, and counters since start."""
        pool, s = self.pool, self.scheduler
        used = sum(1 for c in pool.refs if c)
        return dict(requests_running=len(s.running), requests_waiting=len(s.waiting),
                    blocks_total=pool.num_blocks, blocks_used=used, blocks_free=pool.num_free,
                    blocks_cached=pool.num_cached, prefix_hit_tokens=s.hit_tokens, preemptions=s.preemptions,
                    **self.counters)

"""The serving engine: continuous batching on a paged KV cache with prefix caching.

blocks.py (block pool, ref counts, prefix keys), scheduler.py (queues, token budget, chunked
prefill, preemption), paged.py (the paged KV pool and attention over block tables), engine.py
(one step: batch, forward, sample per request), request.py (a request and its sampling settings).
"""
from .engine import Engine, EngineSettings
from .request import Request, SamplingParams

__all__ = ["Engine", "EngineSettings", "Request", "SamplingParams"]

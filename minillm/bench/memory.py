"""Memory: what loading allocates (RssAnon, sampled for its peak), and the memory-bandwidth roof
(decode at batch 1 cannot beat read bandwidth / bytes read per token)."""
from __future__ import annotations

import threading
import time

import torch

from .systems import sync


def rss_anon() -> int:
    """Anonymous resident bytes of this process (Linux; 0 elsewhere): what loading allocates,
    unlike mmapped file pages (RssFile), which the kernel can drop and share."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


class PeakRssAnon:
    """Samples RssAnon every millisecond on a thread (torch copies release the GIL) for its peak."""

    def __enter__(self):
        self.base = self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())
        self.growth = self.peak - self.base


@torch.inference_mode()
def read_bandwidth(device, mbytes: int = 256, reps: int = 5) -> dict:
    """Bytes/s read by a streaming sum and by a matrix-vector product over `mbytes` (more than any
    last-level cache), best of `reps`, at the current thread count; on CPU also by minillm's own
    one-row product (kernels/cpu_gemv.c), whose prefetching reads faster than torch's sum here
    (a roof that the decode beat would not be one)."""
    n = mbytes * 2**20 // 4
    x = torch.full((n // 4096, 4096), 1.0, device=device)       # fp32
    v = torch.ones(1, 4096, device=device)
    probes = {"sum": lambda: x.sum(), "matvec": lambda: torch.nn.functional.linear(v, x)}
    if torch.device(device).type == "cpu":
        from ..kernels import cpu_gemv
        if cpu_gemv.available():
            probes["loops"] = lambda: cpu_gemv.gemv(v, x)
    out = {}
    for name, fn in probes.items():
        best = float("inf")
        for _ in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        out[name] = x.numel() * 4 / best
    del x
    return out


def bytes_per_token(model, context: int) -> dict:
    """What one decode step at batch 1 must read: every weight it uses (the embedding table only by
    one row unless it is also the head; routed experts only top-k of them) and the KV cache."""
    cfg, embed = model.cfg, getattr(model.embed, "weight", None)
    weights = 0
    for name, p in model.named_parameters():                   # tied head: counted once, as head
        size = p.numel() * p.element_size()
        if p is embed and not cfg.tie_embeddings:
            size = p.shape[1] * p.element_size()
        elif ".experts" in name and cfg.n_routed_experts:
            size = size * cfg.num_experts_per_tok // cfg.n_routed_experts
        weights += size
    kv = sum(t.element_size() * t[:, 0, :context].numel()
             for t in model.new_cache(1, context).tensors.values())
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())

"""How the Linear layers should multiply on this CPU: measured once per machine, not assumed.

Decode at batch 1 is a chain of matrix-vector products over weights that do not fit in cache, so
it runs at whatever share of the memory bandwidth the kernel manages to use, and that depends on
the weight's layout, the library and the CPU. MKL's gemv streams a W stored (in, out) (the x @ W
case) faster than one stored (out, in) on some machines; on AMD, where MKL takes a generic path,
oneDNN's brgemm is as fast at one row and ~2x faster at 8 rows and in prefill, at ~10 us more per
call; for bf16, minillm's own loops (kernels/cpu_gemv.c, up to 8 rows) read ~1.5x faster than
oneDNN at one row on a Xeon. So a plan is a weight layout plus a library for few rows and one for
more; the probe times each (layout, library) on M = 1 and M = 8 rows streamed through ~64 MB of
weights (more than a last-level cache), for the dtype and thread count at hand, and the plan with
the least total wins if it beats the dtype's default (default_plan) by 10% in two runs. The verdict
is kept in MINILLM_CACHE/cpu-plans.json (keyed by CPU, torch version, dtype, threads and the plan
list's version); a probe that overran its time budget (busy cores) keeps nothing.
MINILLM_CPU_PLAN=<plan name> overrides it.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .kernels import cpu_gemv

PLANS = {  # name -> (weight layout, oneDNN for inputs of at least this many rows (0: never),
           #          minillm's own loops for inputs of at most this many rows (0: never))
    "blas": ("out_in", 0, 0),            # torch's default: F.linear on the (out, in) weight
    "blas-t": ("in_out", 0, 0),          # F.linear on a weight stored transposed: BLAS's x @ W case
    "onednn": ("out_in", 1, 0),          # torch.ops.mkldnn._linear_pointwise (oneDNN brgemm)
    "blas+onednn": ("out_in", 2, 0),     # one row on BLAS (less overhead per call), more on oneDNN
    "blas-t+onednn": ("in_out", 2, 0),
    "loops": ("out_in", 0, 8),           # up to 8 rows on kernels/cpu_gemv.c, more on BLAS
}
PLANS_VERSION = 2   # part of the cache key: a new plan is measured, not hidden by an old verdict
OUT, IN = 2048, 1024                # one probe matrix, the size of a small model's projection
PROBE_BUDGET_S = 3.0


def cache_root() -> Path:
    root = os.environ.get("MINILLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "minillm"
    return Path(root).expanduser()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


HUGE_PAGE = 2 << 20


def huge_page_offset(t: torch.Tensor) -> int:
    """The byte offset of t's first 2 MiB boundary."""
    return -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE - t.data_ptr()


def huge_pages(t: torch.Tensor, stop: threading.Event | None = None):
    """Back `t`'s memory, once it is filled, with 2 MiB pages (best effort). Decode streams every
    weight once per token; in 4 KiB pages each page costs a TLB miss and a stop of the hardware
    prefetcher, which does not cross page boundaries: llama-125m bf16 decodes 10-19% faster here
    (fp32 about the same, since the loops prefetch). MADV_COLLAPSE (Linux 6.1+) collapses the
    filled pages; older kernels get MADV_HUGEPAGE, and khugepaged collapses them later. Either
    way the kernel must find free 2 MiB pages, compacting memory when the page cache has
    fragmented it: ~1-2 s for 500 MB in these VMs, most of a load, which is why the loader runs
    this in a thread of its own (huge_pages_later). In 32 MiB pieces, checking `stop` between."""
    start = t.data_ptr() + huge_page_offset(t)
    end = (t.data_ptr() + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    if not (sys.platform.startswith("linux") and t.device.type == "cpu" and end > start):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    for at in range(start, end, 16 * HUGE_PAGE):
        if stop is not None and stop.is_set():
            return
        args = ctypes.c_void_p(at), ctypes.c_size_t(min(16 * HUGE_PAGE, end - at))
        if libc.madvise(*args, 25):            # MADV_COLLAPSE
            libc.madvise(*args, 14)            # MADV_HUGEPAGE


_stop = threading.Event()
_collapsing: list[threading.Thread] = []


def huge_pages_later(t: torch.Tensor):
    """huge_pages(t) in a daemon thread at the lowest priority (the compaction should not slow
    what runs next: a second load, the first tokens). At exit it is stopped between pieces and
    joined: a daemon thread still inside madvise when the interpreter finalizes was killed
    mid-call, which aborted the process ("terminate called without an active exception")."""
    def run():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        huge_pages(t, _stop)
    _collapsing[:] = [th for th in _collapsing if th.is_alive()]
    th = threading.Thread(target=run, daemon=True, name="minillm-huge-pages")
    _collapsing.append(th)
    th.start()


def huge_pages_settled(timeout: float | None = None):
    """Wait for huge_pages_later's threads (a benchmark timing what comes after a load)."""
    for th in list(_collapsing):
        th.join(timeout)


@atexit.register
def _stop_collapsing():
    _stop.set()
    huge_pages_settled(timeout=5)


def onednn_linear(x, w, b=None):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@functools.cache
def upcast_bf16() -> bool:
    """Whether bf16 products of many rows (prefill) run in fp32 here: on a CPU without AMX, oneDNN's
    bf16 GEMM (AVX512-BF16 at best) is slower than MKL's fp32 one even counting the weight's
    conversion (SmolLM2's gate|up at 512 rows, 2 threads, on an AVX512-BF16 Xeon without AMX:
    11.9 ms bf16, 7.5 ms converted to fp32). The products are exact in fp32 either way and sum in
    fp32; the output is rounded to bf16 once. A prompt's attention follows (attention.sdpa: torch's
    CPU flash kernel, 512 tokens, 9 heads: 4.5 ms bf16, 3.1 ms fp32 with the upcasts).
    MINILLM_BF16_UPCAST=0 or 1 overrides."""
    forced = os.environ.get("MINILLM_BF16_UPCAST")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" not in flags and platform.machine() in ("x86_64", "AMD64")


_scratch_buffers: dict[torch.dtype, torch.Tensor] = {}


def scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """One reusable buffer per dtype for a weight converted for one product (a dequantized int8/int4
    weight, a bf16 weight in fp32): allocating one per product would cost a page fault per 4 KiB
    each time. Grows to the largest weight."""
    buf = _scratch_buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = _scratch_buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def upcast_linear(x, w, b=None):
    """F.linear of bf16 x and w (and b) computed in fp32 (upcast_bf16), the output bf16."""
    wf = scratch(w.numel(), torch.float32).view(w.shape).copy_(w)
    return F.linear(x.float(), wf, None if b is None else b.float()).to(x.dtype)


def loops_linear(x, w, b=None):
    """kernels/cpu_gemv.c's product for few rows: fp32 sums, the output in x's dtype."""
    if x.numel() == 0:
        return F.linear(x, w, b)
    if x.dtype is torch.bfloat16 and w.dtype is torch.bfloat16:   # bf16 in and out, no casts
        y = cpu_gemv.gemv(x.contiguous(), w)
    else:
        y = cpu_gemv.gemv(cpu_gemv.f32(x), w)
        y = y if x.dtype is torch.float32 else y.to(x.dtype)
    return y + b if b is not None else y


def loops_work(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16) and cpu_gemv.available()


def onednn_works(dtype: torch.dtype) -> bool:
    """oneDNN's CPU inner product takes fp32 and bf16 (fp16 only where the CPU has AVX512-FP16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        onednn_linear(torch.ones(1, 16, dtype=dtype), torch.ones(16, 16, dtype=dtype))
        return True
    except RuntimeError:
        return False


@torch.inference_mode()
def measure(dtype: torch.dtype, mbytes: int = 64, reps: int = 5, deadline: float = float("inf")) -> dict:
    """Seconds per plan for M = 1 and M = 8 rows through `mbytes` of weights. Each product is timed
    alone and its fastest of `reps` passes kept (a shared machine's preemptions only ever add
    time), so a sum is what the plan costs when it gets the cores. {} past `deadline`."""
    n = max(2, mbytes * 2**20 // (OUT * IN * torch.empty(0, dtype=dtype).element_size()))
    buf = torch.empty(n, OUT, IN, dtype=dtype)
    buf.fill_(0.01)
    huge_pages(buf)                                                   # as the loader's weights
    weights = {"out_in": list(buf),                                  # (OUT, IN), rows contiguous
               "in_out": [b.view(IN, OUT).t() for b in buf]}         # (OUT, IN), columns contiguous
    xs = {m: torch.full((m, IN), 0.5, dtype=dtype) for m in (1, 8)}
    libs = {"blas": F.linear, **({"onednn": onednn_linear} if onednn_works(dtype) else {}),
            # fp32: MKL's one-row product already streams near the bandwidth roof; the loops won
            # the probe's 8-row case but lost ~10% at one row on SmolLM2 (Xeon): not offered
            **({"loops": loops_linear} if loops_work(dtype) and dtype != torch.float32 else {})}
    best = {}                                                         # (layout, lib, M, i) -> s
    for rep in range(reps + 1):                                       # the first pass warms up
        if time.perf_counter() > deadline:
            return {}
        for layout, ws in weights.items():                            # interleaved: drifting load
            for lib, linear in libs.items():                          # hurts every one alike
                for m, x in xs.items():
                    if lib == "loops" and layout != "out_in":                # they read rows
                        continue
                    for i, w in enumerate(ws):                        # n matrices > cache: streamed
                        t = time.perf_counter()
                        linear(x, w)
                        t = time.perf_counter() - t
                        if rep:
                            best[layout, lib, m, i] = min(best.get((layout, lib, m, i), t), t)
    cost = lambda layout, lib, m: sum(best.get((layout, lib, m, i), float("inf")) for i in range(n))
    out = {}
    for name, (layout, rows, loop_rows) in PLANS.items():
        one, many = ("onednn" if rows == 1 else "blas"), ("onednn" if rows else "blas")
        if loop_rows:
            one = many = "loops"
        if one in libs and many in libs:
            out[name] = cost(layout, one, 1) + cost(layout, many, 8)
    return out


def default_plan(dtype: torch.dtype) -> str:
    """Without a measurement: torch's default for fp32 (its BLAS is near the bandwidth roof at one
    row); for 16-bit weights, whose one-row BLAS path can be ~8x slower (bf16 on MKL here), the
    loops, else oneDNN."""
    if dtype == torch.float32:
        return "blas"
    return "loops" if loops_work(dtype) else "onednn" if onednn_works(dtype) else "blas"


def plan(dtype: torch.dtype) -> str:
    """The fastest plan for this dtype at the current thread count (measured once, then cached)."""
    return _plan(dtype, torch.get_num_threads())


@functools.cache
def _plan(dtype: torch.dtype, threads: int) -> str:
    forced = os.environ.get("MINILLM_CPU_PLAN")
    if forced:
        if forced not in PLANS:
            raise ValueError(f"MINILLM_CPU_PLAN={forced!r}: choose from {', '.join(PLANS)}")
        _, rows, loop_rows = PLANS[forced]
        return forced if (not rows or onednn_works(dtype)) and (not loop_rows or loops_work(dtype)) else "blas"
    key = f"{cpu_name()} | torch {torch.__version__} | {dtype} | {threads} threads | plans v{PLANS_VERSION}"
    file = cache_root() / "cpu-plans.json"
    try:
        known = json.loads(file.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known and known[key].get("plan") in PLANS:
        return known[key]["plan"]
    # ~0.6 s on an idle machine; far longer means the cores are busy and the timings say little
    deadline = time.perf_counter() + PROBE_BUDGET_S
    runs = measure(dtype, deadline=deadline), measure(dtype, deadline=deadline)
    fallback = default_plan(dtype)
    if not all(runs):   # busy cores: the default now, and no verdict kept (measured next time)
        return fallback
    seconds = {p: min(r[p] for r in runs) for p in runs[0]}
    best = min(seconds, key=seconds.get)
    # leave the default only for a clear win in both runs: on a shared machine a preempted
    # probe can make any plan look fast
    if any(r[best] > 0.9 * r[fallback] for r in runs):
        best = fallback
    known[key] = {"plan": best, "seconds": {p: round(s, 5) for p, s in seconds.items()}}
    try:                                                              # a read-only home is no error
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(file)
    except OSError:
        pass
    return best

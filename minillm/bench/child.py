"""Load time and cold start, each measured in a fresh process (a warm process would hide imports,
allocator state and page faults). `python -m minillm.bench.child load SYSTEM PATH DEVICE DTYPE
BACKEND` is the child that times one load; the cold start times a whole `minillm generate`."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .memory import PeakRssAnon
from .systems import SYSTEMS, sync


def _load_child(system: str, path: str, device: str, dtype: str, backend: str, quantize: str = "", n_ctx: str = ""):
    """Run in a subprocess: warm the page cache, then time one load and its RssAnon peak, then a
    second load in the same (now warm) process."""
    from ..loader import weight_files
    from ..locate import parse_dtype
    chunk = bytearray(8 << 20)
    for f in [Path(path)] if Path(path).suffix == ".gguf" else weight_files(Path(path)):
        with open(f, "rb") as fh:
            while fh.readinto(chunk):
                pass
    del chunk
    cls = SYSTEMS[system]
    if system == "transformers":
        import transformers  # noqa: F401  (the import is not the load)
    if system == "llama.cpp":
        from .llamacpp import require
        require()            # nor is this one
    kwargs = {"n_ctx": int(n_ctx)} if system == "llama.cpp" and n_ctx else {}
    if torch.device(device).type == "cuda":
        torch.cuda.init()
    def timed_load():
        t0 = time.perf_counter()
        s = cls(path, device, parse_dtype(dtype), backend, quantize or None, **kwargs)
        sync(device)
        return time.perf_counter() - t0, s

    with PeakRssAnon() as mem:
        load_s, s = timed_load()
    out = {"load_s": load_s, "rss_anon_growth": mem.growth}
    if torch.device(device).type == "cuda":
        out["cuda_allocated"] = torch.cuda.max_memory_allocated(device)
    del s
    gc.collect()
    from ..cpu import huge_pages_settled
    huge_pages_settled()              # the first load's page collapse (its own cost, not the next's)
    out["load_again_s"] = timed_load()[0]   # again, in this process: what a notebook pays
    print(json.dumps(out))


def _subprocess(args: list[str], threads: int, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(args[:4])} ... failed: {tail}")
    return r


def measure_load(system, path, device, dtype, backend, threads, quantize=None, n_ctx=None) -> dict:
    dtype = str(dtype or "float32").removeprefix("torch.")     # llama.cpp: unused
    r = _subprocess([sys.executable, "-m", "minillm.bench.child", "load", system, str(path), str(device),
                     dtype, backend, quantize or "", str(n_ctx or "")], threads)
    return json.loads(r.stdout.strip().splitlines()[-1])


HF_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, device, dtype, prompt = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
ids = tok(prompt, return_tensors="pt").input_ids.to(device)
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
print(tok.decode(out[0]))
"""
PROMPT = "def fibonacci(n):"


def measure_cold_start(system, path, device, dtype, backend, threads, quantize=None) -> float:
    """Seconds from spawning a process to its exit, having printed one new token: `minillm
    generate`, or the few lines of transformers (HF_SCRIPT) or llama-cpp-python (its COLD_SCRIPT) a
    user would write."""
    dt = str(dtype).removeprefix("torch.")
    if system == "ours":
        args = [sys.executable, "-m", "minillm.cli", "generate", "-m", str(path), PROMPT, "-n", "1",
                "--temperature", "0", "--device", str(device), "--dtype", dt, "--backend", backend,
                "--quantize", quantize or "none"]
    elif system == "llama.cpp":
        from .llamacpp import COLD_SCRIPT
        args = [sys.executable, "-c", COLD_SCRIPT, str(path), str(threads), PROMPT]
    else:
        args = [sys.executable, "-c", HF_SCRIPT, str(path), str(device), dt, PROMPT]
    t0 = time.perf_counter()
    _subprocess(args, threads)
    return time.perf_counter() - t0


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        _load_child(*sys.argv[2:9])
    else:
        sys.exit("usage: python -m minillm.bench.child load SYSTEM PATH DEVICE DTYPE BACKEND")

"""`minillm bench`: load time, prefill, time to first token, decode and batched decode, memory, and
the memory-bandwidth roof, measured against transformers in the same run (`--compare transformers`).

Honest by construction: the same checkpoint, the same token ids, the same dtype and threads for
both systems; repeats interleave the two (ours, theirs, ours, theirs ...) so that a machine whose
load drifts hurts both alike, and medians are reported. Neither system may stop early: ours runs
with no eos ids, transformers with min_new_tokens = max_new_tokens. Prefill and decode are timed
apart the same way for both: the first new token's arrival splits a generate call in two.

`--random SHAPE` builds a random-weight checkpoint in Hugging Face layout (config.json, safetensors,
tokenizer.json) in a cache folder, so nothing is downloaded. Building it needs transformers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .cpu import cache_root, cpu_name
from .loader import LoadError, parse_device

# name -> Hugging Face config.json fields (model_type included); random weights, fixed seed
SHAPES = {
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "llama-125m": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
    # a small DeepSeek-V3: MLA attention (q and kv low-rank), first layer dense, then MoE layers
    # (16 routed experts, top-4 by sigmoid scores within 2 of 4 groups, one shared expert)
    "deepseek-moe": dict(model_type="deepseek_v3", vocab_size=32000, hidden_size=512,
                         intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=128,
                         qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
                         n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                         first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5),
}
COMMON = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
              initializer_range=0.02, bos_token_id=1, eos_token_id=2)


def random_checkpoint(shape: str) -> Path:
    """A random-weight checkpoint of a named shape, built once (with transformers) and cached."""
    if shape not in SHAPES:
        raise LoadError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    hf = {**COMMON, **SHAPES[shape]}
    key = hashlib.sha1(json.dumps(hf, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_root() / "bench" / f"{shape}-{key}"
    if (folder / "config.json").exists():
        return folder
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise LoadError("--random builds its checkpoint with transformers: pip install transformers") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=folder.parent))
    torch.manual_seed(0)
    fields = dict(hf)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.save_pretrained(tmp)
    _tokenizer(tmp)
    try:
        tmp.rename(folder)     # atomic: a half-built folder is never taken for a checkpoint
    except OSError:            # built meanwhile by another process
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _tokenizer(folder: Path):
    """A small byte-level BPE (the ids it makes are all below any shape's vocab): prompts in the
    cold-start run need one; the timed runs use random ids and no tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 8
    tok.train_from_iterator([text, "The quick brown fox jumps over the lazy dog. " * 8], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))


# --- memory -------------------------------------------------------------------------------------

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


# --- the two systems ------------------------------------------------------------------------------

class Ours:
    name = "ours"

    def __init__(self, path, device, dtype, backend):
        from .api import load
        self.llm = load(path, device=device, dtype=dtype, backend=backend)
        self.model, self.device = self.llm.model, self.llm.device

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, new: int):
        """One forward over the prompts into a fresh cache, last position's logits only."""
        B, T = ids.shape
        cache = self.model.new_cache(B, T + new)
        return self.model(ids, 0, cache, last=torch.full((B,), T - 1, device=ids.device))

    def generate(self, ids: torch.Tensor, new: int, clock: list):
        """Greedy, exactly `new` tokens (no eos ids: nothing stops early); the loop the API runs."""
        from .generate import Sampling, run
        for _ in run(self.model, None, ids.tolist(), new, Sampling(), set(), [], None):
            clock.append(time.perf_counter())   # one yield per step, after its tokens are known


class Transformers:
    name = "transformers"

    def __init__(self, path, device, dtype, backend):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.pad = self.model.generation_config.eos_token_id
        self.pad = self.pad[0] if isinstance(self.pad, list) else (self.pad if self.pad is not None else 0)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, new: int):
        from transformers import DynamicCache

        from .verify import hf_cache_name
        cache = {hf_cache_name(self.model): DynamicCache(config=self.model.config)}
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


# --- load and cold start, each in a fresh process ---------------------------------------------------

def _load_child(system: str, path: str, device: str, dtype: str, backend: str):
    """Run in a subprocess: warm the page cache, then time one load and its RssAnon peak."""
    from .loader import parse_dtype, weight_files
    chunk = bytearray(8 << 20)
    for f in weight_files(Path(path)):
        with open(f, "rb") as fh:
            while fh.readinto(chunk):
                pass
    del chunk
    cls = SYSTEMS[system]
    if system == "transformers":
        import transformers  # noqa: F401  (the import is not the load)
    if torch.device(device).type == "cuda":
        torch.cuda.init()
    with PeakRssAnon() as mem:
        t0 = time.perf_counter()
        s = cls(path, device, parse_dtype(dtype), backend)
        sync(device)
        load_s = time.perf_counter() - t0
    out = {"load_s": load_s, "rss_anon_growth": mem.growth}
    if torch.device(device).type == "cuda":
        out["cuda_allocated"] = torch.cuda.max_memory_allocated(device)
    del s
    print(json.dumps(out))


def _subprocess(args: list[str], threads: int, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(args[:4])} ... failed: {tail}")
    return r


def measure_load(system, path, device, dtype, backend, threads) -> dict:
    r = _subprocess([sys.executable, "-m", "minillm.bench", "load", system, str(path), str(device),
                     str(dtype).removeprefix("torch."), backend], threads)
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


def measure_cold_start(system, path, device, dtype, backend, threads) -> float:
    """Seconds from spawning a process to its exit, having printed one new token: `minillm
    generate`, or the few lines of transformers a user would write (HF_SCRIPT)."""
    dt = str(dtype).removeprefix("torch.")
    if system == "ours":
        args = [sys.executable, "-m", "minillm.cli", "generate", "-m", str(path), PROMPT, "-n", "1",
                "--temperature", "0", "--device", str(device), "--dtype", dt, "--backend", backend]
    else:
        args = [sys.executable, "-c", HF_SCRIPT, str(path), str(device), dt, PROMPT]
    t0 = time.perf_counter()
    _subprocess(args, threads)
    return time.perf_counter() - t0


# --- the memory-bandwidth roof ---------------------------------------------------------------------

@torch.inference_mode()
def read_bandwidth(device, mbytes: int = 256, reps: int = 5) -> dict:
    """Bytes/s read by a streaming sum and by a matrix-vector product over `mbytes` (more than any
    last-level cache), best of `reps`, at the current thread count."""
    n = mbytes * 2**20 // 4
    x = torch.full((n // 4096, 4096), 1.0, device=device)       # fp32
    v = torch.ones(1, 4096, device=device)
    out = {}
    for name, fn in (("sum", lambda: x.sum()), ("matvec", lambda: torch.nn.functional.linear(v, x))):
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
    cfg, embed = model.cfg, model.embed.weight
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


# --- the run -----------------------------------------------------------------------------------------

def median(xs):
    return statistics.median(xs) if xs else None


def bench(path, device=None, dtype=None, backend="auto", prompt_lens=(128, 512), new_tokens=64,
          batches=(1, 8), compare=None, repeat=3, threads=None, cold_start=True, log=None) -> dict:
    """All measurements; `compare` = "transformers" adds it, run interleaved with ours."""
    from .loader import DTYPES, parse_dtype, read_config
    log = log or (lambda msg: None)
    device = parse_device(device)
    hf = read_config(Path(path))                                # as load: fp32 on CPU, else the
    saved = DTYPES.get(hf.get("dtype") or hf.get("torch_dtype") or "", torch.float32)   # checkpoint's
    dtype = parse_dtype(dtype) or (torch.float32 if device.type == "cpu" else saved)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    if new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (decode is timed after the first token)")
    names = ["ours"] + ([compare] if compare else [])
    if compare and compare not in SYSTEMS:
        raise ValueError(f"--compare {compare!r}: only 'transformers' is supported")
    if compare:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise LoadError("--compare transformers needs transformers: pip install transformers") from None

    log(f"loading {path} ({dtype}, {device}, {threads} threads)")
    systems = {n: SYSTEMS[n](path, device, dtype, backend) for n in names}
    model = systems["ours"].model
    cfg = model.cfg
    lens = sorted(set(prompt_lens))
    if max(lens) + new_tokens > cfg.max_position:
        raise ValueError(f"prompt {max(lens)} + {new_tokens} new tokens exceeds the model's context of "
                         f"{cfg.max_position}: use a shorter --prompt-len or fewer --new-tokens")
    # batch 1 at every prompt length; larger batches at the shortest (batched decode throughput)
    rows = [(P, 1) for P in lens] + [(lens[0], B) for B in sorted(set(batches)) if B > 1]
    gen = torch.Generator().manual_seed(0)
    prompts = {(P, B): torch.randint(3, cfg.vocab_size, (B, P), generator=gen).to(device) for P, B in rows}

    for sys_ in systems.values():                               # warm-up: kernels, allocator, caches
        sys_.prefill(prompts[rows[0]][:, :8], 2)
        time_generate(sys_, prompts[rows[0]][:, :8], 2)

    samples = {n: {} for n in names}

    def add(n, key, value):
        samples[n].setdefault(key, []).append(value)

    load_avg = [os.getloadavg()[0]]
    for r in range(repeat):
        order = names if r % 2 == 0 else names[::-1]            # alternate who goes first
        log(f"repeat {r + 1}/{repeat}")
        for P, B in rows:
            for n in order:
                if B == 1:
                    add(n, f"prefill_p{P}_tok_s", time_prefill(systems[n], prompts[P, B], new_tokens))
                if device.type == "cuda":                       # both models sit on the GPU:
                    before = torch.cuda.memory_allocated(device)  # count what the run adds
                    torch.cuda.reset_peak_memory_stats(device)
                ttft, decode = time_generate(systems[n], prompts[P, B], new_tokens)
                if device.type == "cuda":                       # cache + activations, largest run
                    grew = torch.cuda.max_memory_allocated(device) - before
                    samples[n]["cuda_generate_peak_growth_bytes"] = [max(grew, *samples[n].get(
                        "cuda_generate_peak_growth_bytes", [0]))]
                if B == 1:
                    add(n, f"ttft_p{P}_s", ttft)
                add(n, f"decode_p{P}_b{B}_tok_s", decode)
        for n in order:
            m = measure_load(n, path, device, dtype, backend, threads)
            add(n, "load_s", m["load_s"])
            add(n, "load_rss_anon_growth_bytes", m["rss_anon_growth"])
            if "cuda_allocated" in m:
                add(n, "load_cuda_allocated_bytes", m["cuda_allocated"])
            if cold_start and (path / "tokenizer.json").exists():
                add(n, "cold_start_s", measure_cold_start(n, path, device, dtype, backend, threads))
        load_avg.append(os.getloadavg()[0])

    results = {n: {k: median(v) for k, v in samples[n].items()} for n in names}
    wbytes = weight_bytes(model)
    for n in names:
        if results[n].get("load_rss_anon_growth_bytes") is not None:
            results[n]["load_rss_anon_growth_x_weights"] = results[n]["load_rss_anon_growth_bytes"] / wbytes

    # the roof: decode at batch 1 cannot beat (read bandwidth) / (bytes read per token)
    bw = read_bandwidth(device)
    per_token = bytes_per_token(model, lens[0] + new_tokens // 2)
    roof = max(bw.values()) / per_token["total"]
    for n in names:
        results[n]["roof_fraction"] = results[n][f"decode_p{lens[0]}_b1_tok_s"] / roof

    out = {
        "model": str(path), "arch": cfg.arch, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "backend": model.backend, "threads": threads,
        "cpu_plan": _cpu_plan(model) if device.type == "cpu" else None,
        "prompt_lens": lens, "batches": sorted({B for _, B in rows}), "new_tokens": new_tokens,
        "repeat": repeat, "weights_bytes": wbytes,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_1min": load_avg},
        "roof": {"read_bandwidth_bytes_s": bw, "bytes_per_token": per_token,
                 "context": lens[0] + new_tokens // 2, "tok_s": roof},
        **results,
    }
    if compare:
        out["ratios"] = ratios(results["ours"], results[compare])
    return out


def higher_is_better(key: str) -> bool:
    return key.endswith("_tok_s") or key == "roof_fraction"   # rates; times and memory: lower


def ratios(ours: dict, theirs: dict) -> dict:
    """How many times better ours is, per measure: ours/theirs for rates, theirs/ours for times
    and memory; > 1 means ours wins."""
    out = {}
    for k, a in ours.items():
        b = theirs.get(k)
        if a is None or b is None or a <= 0 or b <= 0:
            continue
        out[k] = a / b if higher_is_better(k) else b / a
    return out


def _cpu_plan(model) -> str:
    """The plan the loader gave the largest Linear (small ones stay on BLAS, see set_cpu_plan)."""
    from .cpu import PLANS
    from .model import Linear
    lin = max((m for m in model.modules() if isinstance(m, Linear) and m.weight is not model.embed.weight),
              key=lambda m: m.weight.numel())
    layout = "in_out" if lin.weight.stride(0) == 1 and lin.weight.shape[0] > 1 else "out_in"
    return next((p for p, v in PLANS.items() if v == (layout, lin.onednn_rows)), "?")


# --- the report --------------------------------------------------------------------------------------

def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key.endswith("_bytes"):
        return f"{v / 2**20:.0f} MiB"
    if key.endswith("_x_weights"):
        return f"{v:.2f}x weights"
    if key.endswith("_s") and not key.endswith("_tok_s"):
        return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"
    if key == "roof_fraction":
        return f"{v:.0%}"
    return f"{v:.1f}"


def label(key: str) -> str:
    if m := re.fullmatch(r"prefill_p(\d+)_tok_s", key):
        return f"prefill tok/s, prompt {m[1]}"
    if m := re.fullmatch(r"ttft_p(\d+)_s", key):
        return f"time to first token, prompt {m[1]}"
    if m := re.fullmatch(r"decode_p(\d+)_b(\d+)_tok_s", key):
        return f"decode tok/s, batch {m[2]}, prompt {m[1]}" if m[2] == "1" else \
            f"decode throughput tok/s, batch {m[2]}, prompt {m[1]}"
    return {"load_s": "load time (warm page cache)", "load_rss_anon_growth_bytes": "RssAnon growth while loading",
            "load_rss_anon_growth_x_weights": "RssAnon growth / weights' bytes",
            "load_cuda_allocated_bytes": "CUDA peak allocated while loading",
            "cold_start_s": "cold start to first token (process)", "roof_fraction": "share of the bandwidth roof",
            "cuda_generate_peak_growth_bytes": "CUDA peak growth while generating"}.get(key, key)


def report(out: dict) -> str:
    names = [n for n in SYSTEMS if n in out]
    order = ["load_s", "load_rss_anon_growth_bytes", "load_rss_anon_growth_x_weights", "cold_start_s",
             "prefill", "ttft", "decode_p", "roof_fraction"]
    keys = sorted(out["ours"], key=lambda k: next(i for i, o in enumerate(order + [""]) if k.startswith(o)))
    head = "| measure | " + " | ".join(names) + (" | ours / theirs |" if "ratios" in out else " |")
    lines = [head, "|---" * (len(names) + 1 + ("ratios" in out)) + "|"]
    for k in keys:
        row = [label(k)] + [_fmt(k, out[n].get(k)) for n in names]
        if "ratios" in out:
            r = out["ratios"].get(k)
            row.append("-" if r is None else f"{r:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    roof = out["roof"]
    bw = ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in roof["read_bandwidth_bytes_s"].items())
    bpt = roof["bytes_per_token"]
    lines += [
        "",
        f"model {out['model']} ({out['arch']}), {out['dtype']} on {out['device']}, {out['threads']} threads, "
        f"cpu plan {out['cpu_plan']}, {out['new_tokens']} new tokens, median of {out['repeat']}",
        f"roof: read bandwidth {bw}; a decode step at batch 1 reads {bpt['total'] / 2**20:.0f} MiB "
        f"(weights {bpt['weights'] / 2**20:.0f} + KV cache {bpt['kv_cache'] / 2**20:.1f} at "
        f"{roof['context']} tokens) -> at most {roof['tok_s']:.1f} tok/s",
        f"machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, 1-min load average "
        + " -> ".join(f"{x:.1f}" for x in out["machine"]["load_avg_1min"]),
        "ratios: > 1 means ours is better (theirs/ours for times and memory, ours/theirs for rates)"
        if "ratios" in out else "",
    ]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":   # `python -m minillm.bench load SYSTEM PATH DEVICE DTYPE BACKEND` (a child)
    if sys.argv[1:2] == ["load"]:
        _load_child(*sys.argv[2:7])
    else:
        sys.exit("usage: minillm bench ... (this module's own entry is for its load subprocesses)")

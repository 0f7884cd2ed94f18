"""`minillm bench`: load time, prefill, time to first token, decode and batched decode, memory, and
the memory-bandwidth roof, measured against transformers (`--compare transformers`) or llama.cpp
(`--compare llama.cpp`, llamacpp.py, on GGUF files) in the same run; minillm in one or several
configurations (`--dtype` / `--quantize` lists), on its engine (systems.py).

Honest by construction: the same checkpoint, the same token ids, the same dtype and threads for
every system; repeats interleave them (ours, theirs, ... then the reverse order) so that a machine
whose load drifts hurts all alike, and medians are reported. Neither system may stop early: ours runs
with no eos ids, transformers with min_new_tokens = max_new_tokens. Prefill and decode are timed
apart the same way for both: the first new token's arrival splits a generate call in two.

`--random SHAPE` builds a random-weight checkpoint in Hugging Face layout (config.json, safetensors,
tokenizer.json) in a cache folder, so nothing is downloaded. Building it needs transformers.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import quant
from ..cpu import cache_root, cpu_name
from ..hf import require as hf_require
from ..random_checkpoint import build_tokenizer, save_random_model
from ..errors import UsageError
from ..locate import default_dtype, parse_device, parse_dtype
from .child import measure_cold_start, measure_load
from .memory import PeakRssAnon, bytes_per_token, read_bandwidth, rss_anon, weight_bytes
from .table import ratios, report
from .systems import SYSTEMS, time_generate, time_prefill

__all__ = ["bench", "random_checkpoint", "report", "ratios", "SHAPES", "PeakRssAnon", "rss_anon"]

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
PROMPT_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 8


def random_checkpoint(shape: str, log=None) -> Path:
    """A random-weight checkpoint of a named shape, built once (with transformers) and cached."""
    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    config = {**COMMON, **SHAPES[shape]}
    key = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_root() / "bench" / f"{shape}-{key}"
    if (folder / "config.json").exists():
        return folder
    transformers = hf_require("--random")
    if log:
        log(f"building the random {shape} checkpoint once (transformers, seed 0) in {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=folder.parent))
    fields = dict(config)
    save_random_model(tmp, transformers.AutoConfig.for_model(fields.pop("model_type"), **fields), seed=0)
    # prompts in the cold-start run need a tokenizer; the timed runs use random ids and none
    build_tokenizer(tmp, [PROMPT_TEXT, "The quick brown fox jumps over the lazy dog. " * 8], vocab_size=400)
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


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def median(xs):
    return statistics.median(xs) if xs else None


@dataclass
class Spec:
    """One system in the run: which kind (SYSTEMS), on which file, dtype and quantization."""
    key: str                        # unique, the report's column: "ours", "ours int4", "llama.cpp Q4_0"
    kind: str                       # "ours" | "transformers" | "llama.cpp"
    path: Path
    dtype: torch.dtype | None = None
    quantize: str | None = None
    bits: float | None = None       # bits per weight, to pair systems for ratios
    info: dict = field(default_factory=dict)


def _list(value) -> list:
    """None -> [None]; "a,b" -> ["a", "b"]; a list stays (each item split at commas too)."""
    if value is None:
        return [None]
    items = [value] if isinstance(value, str) else list(value)
    out = [x.strip() if isinstance(x, str) else x for v in items for x in (v.split(",") if isinstance(v, str) else [v])]
    return list(dict.fromkeys(out)) or [None]


SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _bits_of_file_type(ft: str) -> float | None:
    if ft in ("F32", "F16", "BF16"):
        return {"F32": 32, "F16": 16, "BF16": 16}[ft]
    m = re.match(r"(?:I?Q|TQ|MXFP)(\d)", ft)
    return float(m[1]) if m else None


def plan(path: Path, device, dtypes, quantizes, compare, llama_gguf, saved) -> list[Spec]:
    """The systems to run, ours first: every (dtype, quantization) pair asked for, then each
    compared system (transformers in each dtype; llama.cpp on each GGUF). Bad input fails here."""
    # unquantized in each dtype; quantized in the first one (the kernels run their products in bf16
    # whatever it is: quant.Packed.mm), so `--dtype float32,bfloat16 --quantize none,int8,int4` gives
    # the four rows fp32, bf16, int8, int4
    dts = [parse_dtype(d) or default_dtype(device, saved) for d in dtypes]
    if len(dts) > 1 and None not in quantizes:
        raise UsageError("several --dtype values give unquantized runs: add none to --quantize "
                         "(quantized runs take the first --dtype)")
    ours = [Spec("ours", "ours", path, dt, None, torch.finfo(dt).bits) for dt in dts if None in quantizes]
    ours += [Spec("ours", "ours", path, dts[0], q, 8 if q == "int8" else 4) for q in quantizes if q]
    if len(ours) > 1:                   # "ours fp32", "ours bf16", "ours int8", "ours int4:g32"
        for s in ours:
            s.key = "ours " + (s.quantize or SHORT.get(s.dtype, str(s.dtype).removeprefix("torch.")))
    if len({s.key for s in ours}) < len(ours):
        raise UsageError("the same --dtype / --quantize configuration is listed twice")
    specs = list(ours)
    if "transformers" in compare:
        if path.suffix == ".gguf":
            raise UsageError("--compare transformers reads checkpoint folders, not GGUF files")
        hf_require("--compare transformers")
        dts = list(dict.fromkeys(s.dtype for s in ours))
        for dt in dts:
            key = "transformers" if len(dts) == 1 else f"transformers {SHORT.get(dt, dt)}"
            specs.append(Spec(key, "transformers", path, dt, None, torch.finfo(dt).bits))
    if "llama.cpp" in compare:
        from . import llamacpp
        if device.type != "cpu":
            raise UsageError("--compare llama.cpp runs on CPU here: use --device cpu")
        files = [Path(f) for f in llama_gguf] or ([path] if path.suffix == ".gguf" else [])
        if not files:
            raise UsageError(f"--compare llama.cpp runs GGUF files and {path} is a checkpoint folder: give "
                             "--llama-gguf FILE (the same model as GGUF; repeat it for several variants)")
        for f in files:
            if f.suffix != ".gguf" or not f.is_file():
                raise UsageError(f"--llama-gguf {f}: not a .gguf file")
        llamacpp.require()                                      # installed? before any loading
        for f in files:
            info = llamacpp.describe(f)
            key = f"llama.cpp {info['file_type']}"
            if any(s.key == key for s in specs):
                key += f" ({f.stem})"
            specs.append(Spec(key, "llama.cpp", f, None, None, _bits_of_file_type(info["file_type"]), info))
    return specs


def pairs(specs: list[Spec]) -> list[tuple[str, str]]:
    """(ours, theirs) to give ratios for: each compared system against our configurations of the
    same bits per weight (fp32 ~ F32, bf16 ~ F16, int8 ~ Q8_0, int4 ~ Q4_0 / Q4_1); one with no
    such partner against every configuration of ours."""
    ours = [s for s in specs if s.kind == "ours"]
    out = []
    for t in (s for s in specs if s.kind != "ours"):
        same = [o for o in ours if o.bits == t.bits] or ours
        out += [(o.key, t.key) for o in same]
    return out


def scheme(model, path: Path) -> str:
    """How minillm holds the weights: the dtype, or the quantization scheme and what it stores."""
    q = model.run.quantize
    dt = str(model.dtype).removeprefix("torch.")
    if not q:
        text = f"weights {dt} (unquantized"
        if path.suffix == ".gguf":
            from .llamacpp import file_type
            ft = file_type(path)
            if ft not in ("F32", "F16", "BF16"):
                text += f"; the file's {ft} blocks dequantized"
        return text + ")"
    s, summary = model.run.scheme, quant.summary(model)
    text = ("weights int8 symmetric per output channel" if s and s.bits == 8 else
            f"weights int4 asymmetric in groups of {s.group} ({q})" if s else
            f"weights {q}: the file's own blocks on the weight-only kernels") + (", head int8" if s else "")
    if summary["dequantized_layers"]:
        text += f", {summary['dequantized_layers']} layers dequantized (a shape the kernel cannot take)"
    held = ", ".join(f"{k} {mib(v)}" for k, v in sorted(summary["bytes_by_type"].items(), key=lambda kv: -kv[1]))
    return text + f"; held: {held}"


def bench(path, device=None, dtype=None, backend="auto", prompt_lens=(128, 512), new_tokens=64,
          batches=(1, 8), compare=None, repeat=3, threads=None, cold_start=True, log=None,
          quantize=None, llama_gguf=()) -> dict:
    """All measurements. dtype and quantize may be lists (or comma lists): minillm runs unquantized
    in each dtype (if quantize lists none) and quantized in the first dtype. compare: "transformers"
    and/or "llama.cpp" (on `llama_gguf`, else on path when it is a GGUF); every system runs
    interleaved with the others."""
    from ..loader import read_config
    log = log or (lambda msg: None)
    path = Path(path)
    device = parse_device(device)
    # a bad name fails here, before any work
    quantizes = list(dict.fromkeys(quant.parse(q) and quant.parse(q).name for q in _list(quantize)))
    dtypes = _list(dtype)
    for d in dtypes:
        parse_dtype(d)
    compare = [c for c in _list(compare) if c] + (["llama.cpp"] if llama_gguf else [])
    compare = list(dict.fromkeys(compare))
    for c in compare:
        if c not in SYSTEMS or c == "ours":
            raise UsageError(f"--compare {c!r}: choose from transformers, llama.cpp")
    if new_tokens < 2:
        raise UsageError("--new-tokens must be at least 2 (decode is timed after the first token)")
    if path.suffix == ".gguf":                                  # the dtype load would pick
        from ..gguf import GGUFFile, config
        saved = config(GGUFFile(path))[0].torch_dtype
    else:
        hf = read_config(path)
        saved = hf.get("dtype") or hf.get("torch_dtype")
    specs = plan(path, device, dtypes, quantizes, compare, llama_gguf, saved)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    names = [s.key for s in specs]
    by_key = {s.key: s for s in specs}

    systems = {}
    for s in specs:                                             # ours first: its config sets the lengths
        if s.kind == "ours":
            what = f"{s.dtype}" + (f", {s.quantize}" if s.quantize else "")
            log(f"loading {s.path} ({what}, {device}, {threads} threads)")
            systems[s.key] = SYSTEMS[s.kind](s.path, device, s.dtype, backend, s.quantize)
    first = systems[names[0]].model                             # ours, the first configuration
    cfg = first.cfg
    lens = [P for P in sorted(set(prompt_lens)) if P + new_tokens <= cfg.max_position]
    skipped = sorted(set(prompt_lens) - set(lens))
    if not lens:
        raise UsageError(f"prompt {min(prompt_lens)} + {new_tokens} new tokens exceeds the model's context of "
                         f"{cfg.max_position}: use a shorter --prompt-len or fewer --new-tokens")
    if skipped:                                                 # e.g. 512 on a 512-token model
        log(f"skipped prompt length {', '.join(map(str, skipped))}: + {new_tokens} new tokens exceeds "
            f"the model's context of {cfg.max_position}")
    n_ctx = max(lens) + new_tokens                              # llama.cpp's context (and batch)
    for s in specs:
        if s.kind == "transformers":
            log(f"loading {s.path} in transformers ({s.dtype}, {device})")
            systems[s.key] = SYSTEMS[s.kind](s.path, device, s.dtype, backend)
        elif s.kind == "llama.cpp":
            log(f"loading {s.path} in llama.cpp ({threads} threads)")
            systems[s.key] = SYSTEMS[s.kind](s.path, device, n_ctx=n_ctx)
    systems = {n: systems[n] for n in names}
    # batch 1 at every prompt length; larger batches at the shortest (batched decode throughput)
    rows = [(P, 1) for P in lens] + [(lens[0], B) for B in sorted(set(batches)) if B > 1]
    gen = torch.Generator().manual_seed(0)
    prompts = {(P, B): torch.randint(3, cfg.vocab_size, (B, P), generator=gen).to(device) for P, B in rows}

    def runs(n, B):                                             # llama.cpp: batch 1 only
        return B == 1 or getattr(systems[n], "batched", True)

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
                if not runs(n, B):
                    continue
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
            s = by_key[n]
            m = measure_load(s.kind, s.path, device, s.dtype, backend, threads, s.quantize, n_ctx)
            add(n, "load_s", m["load_s"])
            add(n, "load_again_s", m["load_again_s"])
            add(n, "load_rss_anon_growth_bytes", m["rss_anon_growth"])
            if "cuda_allocated" in m:
                add(n, "load_cuda_allocated_bytes", m["cuda_allocated"])
            if cold_start and (s.path.suffix == ".gguf" or (s.path / "tokenizer.json").exists()):
                add(n, "cold_start_s", measure_cold_start(s.kind, s.path, device, s.dtype, backend, threads, s.quantize))
        load_avg.append(os.getloadavg()[0])

    results = {n: {k: median(v) for k, v in samples[n].items()} for n in names}

    # the roof: decode at batch 1 cannot beat (read bandwidth) / (bytes read per token)
    bw = read_bandwidth(device)
    context = lens[0] + new_tokens // 2
    kv_elements = sum(t[:, 0, :context].numel() for t in first.new_cache(1, context).tensors.values())
    roofs, described = {}, []
    for s in specs:
        if s.kind == "llama.cpp":
            from . import llamacpp
            per_token, wbytes = llamacpp.bytes_per_token(s.path, kv_elements), s.info["bytes"]
            s.info["scheme"] = f"file {s.path.name}, tensors " + ", ".join(
                f"{k} x {v}" for k, v in s.info["tensor_types"].items())
        elif s.kind == "ours":
            model = systems[s.key].model
            per_token, wbytes = bytes_per_token(model, context), weight_bytes(model)
            plan_ = f", cpu plan {model.run.cpu_plan}" if device.type == "cpu" else ""
            s.info["scheme"] = scheme(model, s.path) + plan_
        else:   # transformers: the same tensors as our unquantized run in its dtype
            twin = next((o for o in specs if o.kind == "ours" and o.dtype == s.dtype and not o.quantize), specs[0])
            per_token = bytes_per_token(systems[twin.key].model, context)
            wbytes = sum(p.numel() * p.element_size() for p in systems[s.key].model.parameters())
            s.info["scheme"] = f"weights {str(s.dtype).removeprefix('torch.')}"
        s.info["weights_bytes"] = wbytes
        roofs[s.key] = {"bytes_per_token": per_token, "tok_s": max(bw.values()) / per_token["total"]}
        res = results[s.key]
        if res.get("load_rss_anon_growth_bytes") is not None:
            res["load_rss_anon_growth_x_weights"] = res["load_rss_anon_growth_bytes"] / wbytes
        res["roof_fraction"] = res[f"decode_p{lens[0]}_b1_tok_s"] / roofs[s.key]["tok_s"]
        described.append({"key": s.key, "kind": s.kind, "path": str(s.path),
                          "dtype": None if s.dtype is None else str(s.dtype).removeprefix("torch."),
                          "quantize": s.quantize, "bits": s.bits, **s.info})

    out = {
        "model": str(path), "arch": cfg.arch, "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(device), "backend": first.run.backend, "quantize": first.run.quantize, "threads": threads,
        "cpu_plan": first.run.cpu_plan if device.type == "cpu" else None,
        "prompt_lens": lens, "skipped_prompt_lens": skipped, "batches": sorted({B for _, B in rows}), "new_tokens": new_tokens,
        "repeat": repeat, "weights_bytes": weight_bytes(first), "systems": described,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_1min": load_avg},
        "roof": {"read_bandwidth_bytes_s": bw, "bytes_per_token": roofs[names[0]]["bytes_per_token"],
                 "context": context, "tok_s": roofs[names[0]]["tok_s"], "by_system": roofs},
        **results,
    }
    if "llama.cpp" in compare:
        from .llamacpp import require
        out["llama_cpp"] = {"version": getattr(require(), "__version__", "?"), "use_extra_bufts": False,
                            "n_threads": threads, "n_threads_batch": threads, "n_ctx": n_ctx}
    ps = pairs(specs)
    if ps:
        out["ratios"] = {f"{a} / {b}": ratios(results[a], results[b]) for a, b in ps}
    return out

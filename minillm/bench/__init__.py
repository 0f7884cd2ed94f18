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
import statistics
import tempfile
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


def median(xs):
    return statistics.median(xs) if xs else None


def bench(path, device=None, dtype=None, backend="auto", prompt_lens=(128, 512), new_tokens=64,
          batches=(1, 8), compare=None, repeat=3, threads=None, cold_start=True, log=None,
          quantize=None) -> dict:
    """All measurements; `compare` = "transformers" adds it, run interleaved with ours."""
    from ..loader import read_config
    log = log or (lambda msg: None)
    device = parse_device(device)
    quantize = quant.parse(quantize) and quant.parse(quantize).name   # a bad name: before any work
    if Path(path).suffix == ".gguf":                             # the dtype load would pick
        from ..gguf import GGUFFile, config
        saved = config(GGUFFile(path))[0].torch_dtype
        if compare:
            raise UsageError("--compare transformers reads checkpoint folders, not GGUF files")
    else:
        hf = read_config(Path(path))
        saved = hf.get("dtype") or hf.get("torch_dtype")
    dtype = parse_dtype(dtype) or default_dtype(device, saved)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    if new_tokens < 2:
        raise UsageError("--new-tokens must be at least 2 (decode is timed after the first token)")
    names = ["ours"] + ([compare] if compare else [])
    if compare and compare not in SYSTEMS:
        raise UsageError(f"--compare {compare!r}: only 'transformers' is supported")
    if compare:
        hf_require("--compare transformers")

    log(f"loading {path} ({dtype}, {device}, {threads} threads)")
    systems = {n: SYSTEMS[n](path, device, dtype, backend, quantize) for n in names}
    model = systems["ours"].model
    cfg = model.cfg
    lens = [P for P in sorted(set(prompt_lens)) if P + new_tokens <= cfg.max_position]
    skipped = sorted(set(prompt_lens) - set(lens))
    if not lens:
        raise UsageError(f"prompt {min(prompt_lens)} + {new_tokens} new tokens exceeds the model's context of "
                         f"{cfg.max_position}: use a shorter --prompt-len or fewer --new-tokens")
    if skipped:                                                 # e.g. 512 on a 512-token model
        log(f"skipped prompt length {', '.join(map(str, skipped))}: + {new_tokens} new tokens exceeds "
            f"the model's context of {cfg.max_position}")
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
            m = measure_load(n, path, device, dtype, backend, threads, quantize)
            add(n, "load_s", m["load_s"])
            add(n, "load_rss_anon_growth_bytes", m["rss_anon_growth"])
            if "cuda_allocated" in m:
                add(n, "load_cuda_allocated_bytes", m["cuda_allocated"])
            if cold_start and (path.suffix == ".gguf" or (path / "tokenizer.json").exists()):
                add(n, "cold_start_s", measure_cold_start(n, path, device, dtype, backend, threads, quantize))
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
        "device": str(device), "backend": model.run.backend, "quantize": quantize, "threads": threads,
        "cpu_plan": model.run.cpu_plan if device.type == "cpu" else None,
        "prompt_lens": lens, "skipped_prompt_lens": skipped, "batches": sorted({B for _, B in rows}), "new_tokens": new_tokens,
        "repeat": repeat, "weights_bytes": wbytes,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_1min": load_avg},
        "roof": {"read_bandwidth_bytes_s": bw, "bytes_per_token": per_token,
                 "context": lens[0] + new_tokens // 2, "tok_s": roof},
        **results,
    }
    if compare:
        out["ratios"] = ratios(results["ours"], results[compare])
    return out

"""`minillm info`: what a model is and what it costs, without loading its weights.

The model is built on the meta device (shapes, no storage) from config.json alone, so the numbers
are the runtime's own: parameters are counted on the Decoder minillm would run (a tied head once),
and the KV cache per token is measured by allocating the runtime's cache (on meta) for a known
length and dividing, not from a formula. Safetensors headers (local, or read from the hub without
downloading the weights) add the checkpoint's on-disk dtypes and bytes.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .cache import KVCache
from .loader import build, read_config, settings, to_config, weight_files
from .errors import UsageError
from .locate import DTYPES, LoadError, default_dtype, hub_errors, parse_device, parse_dtype, resolve

MEASURE_LEN = 64                      # tokens of cache allocated to measure bytes per token
# routed experts: mlp.experts_gate_up (stacked, minillm.moe), mlp.experts.3.w; not mlp.shared_experts
ROUTED = re.compile(r"(^|\.)experts([._]|$)")
UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(size) -> int:
    """'24GiB' | '24GB' | '24G' (= GiB) | '512MiB' | 1e9 -> bytes."""
    if isinstance(size, (int, float)):
        return int(size)
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m[2].lower() not in UNITS:
        raise UsageError(f"cannot read memory size {size!r} (e.g. 24GiB, 80GB, 512MiB)")
    return int(float(m[1]) * UNITS[m[2].lower()])


def locate(model) -> tuple[Path, dict | None, str]:
    """-> (folder holding config.json, {tensor: (dtype, shape, nbytes)} or None, where from).
    A hub id whose weights are not cached costs its metadata files and safetensors headers only."""
    folder = resolve(model, weights=False)
    headers = local_headers(folder)
    is_local = model is None or Path(model).expanduser().is_dir()
    if is_local or headers is not None:
        return folder, headers, "local folder" if is_local else "hub cache"
    import huggingface_hub as hub
    with hub_errors(str(model)):
        try:
            meta = hub.get_safetensors_metadata(str(model))
        except hub.errors.NotASafetensorsRepoError:
            return folder, None, "hub (config.json only: no safetensors weights)"
    headers = {t: (i.dtype, list(i.shape), i.data_offsets[1] - i.data_offsets[0])
               for f in meta.files_metadata.values() for t, i in f.tensors.items()}
    return folder, headers, "hub (config.json + safetensors headers)"


def local_headers(folder: Path) -> dict | None:
    """Tensor dtypes, shapes and sizes from each safetensors header (8-byte length, then JSON);
    None when the folder holds no (complete) safetensors weights."""
    try:
        files = weight_files(folder)
    except LoadError:
        return None
    out = {}
    for file in files:
        with open(file, "rb") as f:
            try:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError, MemoryError, OverflowError):
                raise LoadError(f"corrupt or truncated safetensors file {file}: unreadable header") from None
        header.pop("__metadata__", None)
        out.update({t: (h["dtype"], h["shape"], h["data_offsets"][1] - h["data_offsets"][0])
                    for t, h in header.items()})
    return out


def count_params(model: torch.nn.Module, cfg) -> tuple[int, int]:
    """-> (total, active per token). Tied parameters count once (named_parameters drops the
    duplicate). Routed experts are any parameter under `experts` (stacked (E, ...) or one module
    per expert); a token runs num_experts_per_tok of n_routed_experts of them, the rest always."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    routed = sum(p.numel() for name, p in params.items() if ROUTED.search(name))
    if not routed or not cfg.n_routed_experts:
        return total, total
    return total, total - routed + routed // cfg.n_routed_experts * cfg.num_experts_per_tok


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes the parameters take at `dtype`; what a module keeps in fp32 (a router bias) stays fp32."""
    keep = {f"{prefix}.{p}".lstrip(".") for prefix, m in model.named_modules()
            for p in getattr(m, "fp32_params", ())}
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(p.numel() * (4 if name in keep else size) for name, p in model.named_parameters())


def quant_bytes(model) -> int:
    """Bytes as loaded: int8 / packed int4 weights, their bf16 scales, what stays in float."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(model) -> int:
    """Measured: the runtime's own cache for batch 1 and MEASURE_LEN tokens, divided."""
    nbytes = model.new_cache(1, MEASURE_LEN).nbytes
    assert nbytes % MEASURE_LEN == 0
    return nbytes // MEASURE_LEN


def info(model_or_path=None, dtype=None, memory=None, device=None, backend: str = "auto",
         quantize: str | None = None) -> dict:
    """A folder, hub id or None (the default model) -> a dict of what it is and costs (see
    format_info). dtype None: as `minillm.load` picks (float32 on CPU, the checkpoint's on GPU).
    memory ('24GiB' or bytes): also the longest context and batch x context whose weights + KV
    cache fit (activations not counted). device / backend: what `load` would run on, which also
    decides the default dtype. quantize: as `load` would quantize (weight bytes as loaded, per
    tensor type, and how many layers the int4 kernel could not take)."""
    from . import gguf, quant
    quant.parse(quantize)
    if (file := gguf.find(model_or_path)) is not None:   # llama.cpp's format: header only, no weights read
        f = gguf.GGUFFile(file)
        (cfg, hf, adapter), path, source = gguf.config(f), file, "GGUF file"
        checkpoint = f.checkpoint_summary()
    else:
        path, headers, source = locate(model_or_path)
        hf = read_config(path)
        cfg, adapter = to_config(hf)
        checkpoint = None if headers is None else checkpoint_summary(headers)
    device = parse_device(device, available=False)   # costs for a GPU can be read on a CPU
    dtype = parse_dtype(dtype) or default_dtype(device, cfg.torch_dtype)
    run = (gguf.run_settings(f, cfg, adapter, device, dtype, backend, quantize) if source == "GGUF file"
           else settings(device, dtype, backend, quantize))   # as load would decide them
    quantize = run.quantize
    qmodel = build(cfg, torch.device("meta"), dtype, run)      # shapes only, no storage
    model = qmodel if not quantize else build(cfg, torch.device("meta"), dtype,
                                              replace(run, quantize=None, schemes=None))
    total, active = count_params(model, cfg)
    kv = kv_bytes_per_token(model)
    H, mla = cfg.num_heads, cfg.attention == "mla"
    kv_expanded = None
    if mla:   # per-head K (nope + rope dims) and V, as MHA would cache them
        shapes = {"k": (H, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), "v": (H, cfg.v_head_dim)}
        kv_expanded = KVCache(shapes, cfg.num_layers, 1, MEASURE_LEN, dtype, "meta").nbytes // MEASURE_LEN
    kind = ("MLA" if mla else "MHA" if cfg.num_kv_heads == H else "MQA" if cfg.num_kv_heads == 1 else "GQA")
    scaling = cfg.rope_scaling
    out = {
        "model": str(model_or_path) if model_or_path is not None else "(default model)",
        "path": str(path), "source": source, "arch": cfg.arch,
        "adapter": adapter.__name__.rsplit(".", 1)[-1],
        "architectures": hf.get("architectures") or [], "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "backend": run.backend, "run": {k: v for k, v in asdict(run).items() if k != "schemes"},
        "params": total, "active_params": active, "tied_embeddings": cfg.tie_embeddings,
        "weight_bytes": weight_bytes(model, dtype) if not quantize else quant_bytes(qmodel),
        "quantization": None if not quantize else {"scheme": run.quantize, **quant.summary(qmodel)},
        "weight_bytes_by_dtype": {n: weight_bytes(model, DTYPES[n])
                                  for n in ("float32", "bfloat16", "float16")},
        "checkpoint": checkpoint,
        "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "attention": kind, "heads": H, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "v_head_dim": cfg.v_head_dim if mla else cfg.head_dim,
        "mla": None if not mla else {
            "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim},
        "moe": None if not cfg.moe_layers else {
            "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "shared_experts": cfg.n_shared_experts, "moe_layers": len(cfg.moe_layers)},
        "intermediate_size": cfg.intermediate_size, "context_length": cfg.max_position,
        "positions": cfg.pos,
        "rope": None if cfg.pos != "rope" else {
            "kind": (scaling or {}).get("rope_type", "default"), "theta": cfg.rope_theta,
            "scaling": scaling, "interleaved": cfg.rope_interleaved, "dim": cfg.rope_dim},
        "kv_cache_bytes_per_token": kv,
        "kv_cache_bytes_per_token_expanded": kv_expanded,
        "kv_cache_ratio": kv_expanded / kv if kv_expanded else None,
        "memory": None,
    }
    if memory is not None:
        out["memory"] = fit(parse_size(memory), out["weight_bytes"], kv, cfg.max_position)
    return out


def checkpoint_summary(headers: dict) -> dict:
    by_dtype: dict[str, int] = {}
    for dt, _, nbytes in headers.values():
        by_dtype[dt] = by_dtype.get(dt, 0) + nbytes
    params = sum(math.prod(shape) for _, shape, _ in headers.values())
    return {"tensors": len(headers), "params": params, "bytes": sum(by_dtype.values()),
            "bytes_by_dtype": by_dtype}


def fit(memory: int, weights: int, kv_per_token: int, context: int) -> dict:
    """What fits in `memory` next to the weights: KV cache tokens, at batch 1 and batched."""
    tokens = max(0, memory - weights) // kv_per_token if kv_per_token else 0
    batches, b = [], 1
    while b <= 1024 and tokens // b >= 1:           # the longest context at batch b
        batches.append({"batch": b, "context": min(context, tokens // b)})
        b *= 2
    return {"bytes": memory, "weight_bytes": weights, "fits_weights": memory >= weights,
            "cache_tokens": tokens,                # batch x context, summed over the batch
            "max_context": min(context, tokens), "max_batch_at_full_context": tokens // context,
            "batch_x_context": batches, "activations_counted": False}


def human(n: float, unit: str = "B") -> str:
    if n is None:
        return "-"
    if unit == "B":
        for u in ["B", "KiB", "MiB", "GiB", "TiB"]:
            if abs(n) < 1024 or u == "TiB":
                return f"{n:.0f} B" if u == "B" else f"{n:.2f} {u}"
            n /= 1024
    for u in ["", "K", "M", "B", "T"]:
        if abs(n) < 1000 or u == "T":
            return f"{n:.0f}" if u == "" else f"{n:.2f}{u}"
        n /= 1000


def format_info(d: dict) -> str:
    """The human-readable form of info()."""
    lines = [f"model      {d['model']}", f"path       {d['path']} ({d['source']})",
             f"arch       {d['arch']} (adapter {d['adapter']}; {', '.join(d['architectures']) or '-'})"]
    params = f"{human(d['params'], '')} ({d['params']:,})"
    if d["tied_embeddings"]:
        params += " tied embeddings counted once"
    if d["moe"]:
        m = d["moe"]
        params += (f"; active per token {human(d['active_params'], '')} ({d['active_params']:,}): "
                   f"{m['experts_per_token']} of {m['routed_experts']} routed experts + "
                   f"{m['shared_experts']} shared, {m['moe_layers']} MoE layers")
    lines.append(f"params     {params}")
    by = ", ".join(f"{k} {human(v)}" for k, v in d["weight_bytes_by_dtype"].items())
    if d.get("quantization"):
        q = d["quantization"]
        types = ", ".join(f"{k} {human(v)}" for k, v in q["bytes_by_type"].items())
        lines.append(f"weights    {human(d['weight_bytes'])} as loaded, {q['scheme']} ({types}); "
                     f"{q['kernel_layers']} layers on the weight-only kernels, {q['dequantized_layers']} "
                     f"dequantized (a shape the int4 kernel cannot take); unquantized: {by}")
    else:
        lines.append(f"weights    {human(d['weight_bytes'])} at {d['dtype']} ({by})")
    if d["checkpoint"]:
        c = d["checkpoint"]
        dts = ", ".join(f"{k} {human(v)}" for k, v in c["bytes_by_dtype"].items())
        lines.append(f"checkpoint {c['tensors']} tensors, {human(c['params'], '')} values, {dts}")
    heads = f"{d['heads']} heads, {d['kv_heads']} kv heads, head dim {d['head_dim']}"
    if d["mla"]:
        m = d["mla"]
        heads = (f"{d['heads']} heads, latent {m['kv_lora_rank']} + rope key {m['qk_rope_head_dim']} shared "
                 f"by all heads, qk dims {m['qk_nope_head_dim']}+{m['qk_rope_head_dim']}, "
                 f"v dim {d['v_head_dim']}")
    lines.append(f"layers     {d['layers']} x {d['attention']}: {heads}; hidden {d['hidden_size']}, "
                 f"vocab {d['vocab_size']}")
    pos = "learned positions" if not d["rope"] else (
        f"rope {d['rope']['kind']} theta {d['rope']['theta']:g}"
        + (f" {json.dumps({k: v for k, v in d['rope']['scaling'].items() if k != 'rope_type'})}"
           if d["rope"]["scaling"] else ""))
    lines.append(f"context    {d['context_length']:,} tokens, {pos}")
    lines.append("runs as     " + ", ".join(f"{k} {v}" for k, v in d["run"].items()) + f" on {d['device']}")
    kv = (f"{human(d['kv_cache_bytes_per_token'])} per token at {d['dtype']}, batch 1 "
          "(measured on the runtime's cache)")
    if d["kv_cache_bytes_per_token_expanded"]:
        kv += (f"; per-head K/V would take {human(d['kv_cache_bytes_per_token_expanded'])} "
               f"({d['kv_cache_ratio']:.1f}x)")
    lines.append(f"kv cache   {kv}")
    if d["memory"]:
        m = d["memory"]
        if not m["fits_weights"]:
            lines.append(f"memory     {human(m['bytes'])}: the weights alone "
                         f"({human(m['weight_bytes'])}) do not fit")
        else:
            bx = ", ".join(f"{r['batch']} x {r['context']:,}" for r in m["batch_x_context"]
                           if r["batch"] <= 64)
            full = (f"batch {m['max_batch_at_full_context']} at full context" if m["max_batch_at_full_context"]
                    else f"full context {d['context_length']:,} does not fit")
            lines.append(f"memory     {human(m['bytes'])} - weights {human(m['weight_bytes'])} leaves KV "
                         f"cache for {m['cache_tokens']:,} tokens: context {m['max_context']:,} at batch 1, "
                         f"{full}; batch x context {bx or '-'} (activations not counted)")
    return "\n".join(lines)

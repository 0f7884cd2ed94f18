"""llama.cpp's GGUF files: `minillm.load("model.gguf")`.

A GGUF file holds metadata under llama.cpp's key names (sizes, rope, the tokenizer, the chat
template) and tensors under llama.cpp's names, float (F32, F16, BF16) or quantized in blocks
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the k-quants Q2_K..Q6_K, ...), read by minillm/gguf_file.py
(memory-mapped; the `gguf` package, llama.cpp's own, dequantizes). The architecture's adapter
(archs/*.py: `from_gguf`, `gguf_targets`) turns the metadata into a Config and each tensor name
into core targets, undoing what llama.cpp's converter changed on the way in.

Q4_0, Q4_1 and Q8_0 tensors are minillm's own packed layouts (quant.py: int4 group 32 affine, int8
with a scale per 32): by default they load as their own bytes (gguf_file.blocks) into quantized
modules and run on the weight-only kernels, exactly the file's values. A module takes them when
all its parts (q/k/v -> qkv, gate/up -> gate_up) have one such scheme, and the adapter's transform
only moves rows (the un-permute of q/k does; DeepSeek's transposed k_b does not). The rest (F32,
F16, k-quants, ...) is dequantized on its own and copied into the model at the run dtype, so peak
memory is about the run weights plus one tensor in float32. `quantize="none"` dequantizes every
tensor (the float model); "int8" requantizes everything per channel; "int4" keeps Q4_0/Q4_1
tensors' bytes and quantizes the others (a Q8_0 head stays as stored: it is int8 already).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch

from minillm import archs

from . import quant
from .config import RunSettings
from .gguf_file import BLOCKS, FLOATS, GGUFFile, blocks
from .loader import _fill, build, destinations, pick_backend, progress_bar, settings, weights_loaded
from .locate import LoadError, default_dtype
from .tokenizer import Tokenizer, TokenizerError


def find(model) -> Path | None:
    """A .gguf file, or a folder with no config.json holding exactly one -> that file; else None."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise LoadError(f"no such file: {path}")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise LoadError(f"{path} holds {len(files)} .gguf files ({', '.join(f.name for f in files)}): "
                            "give the one to load")
        return files[0] if files else None
    return None


def config(f: GGUFFile):
    """-> (Config, config.json-like dict, adapter), from the metadata through the adapter."""
    arch = f.meta.get("general.architecture")
    if arch is None:
        raise LoadError(f"{f.path.name}: no general.architecture in its metadata")
    if not f.tensors:
        raise LoadError(f"{f.path.name} holds no tensors (a vocabulary-only GGUF? "
                        "minillm.Tokenizer.from_gguf reads those)")
    try:
        adapter = archs.pick_gguf(arch)
        cfg, hf = adapter.from_gguf(f.meta, f.shapes, f.read)
    except KeyError as e:
        raise LoadError(f"{f.path.name}: missing metadata key or tensor {e}") from None
    except (ValueError, TypeError) as e:
        raise LoadError(f"{f.path.name}: {e}") from None
    hf["architectures"] = [f"{arch} (GGUF)"]
    kinds = Counter(f.type_name(n) for n, s in f.shapes.items() if len(s) >= 2)
    # the dtype a GPU run defaults to: the file's float type, bfloat16 for quantized files
    cfg.torch_dtype = FLOATS.get(kinds.most_common(1)[0][0], "bfloat16") if kinds else None
    return cfg, hf, adapter


STORED = {"Q4_0": quant.Scheme(4, 32), "Q4_1": quant.Scheme(4, 32), "Q8_0": quant.Scheme(8, 32)}


def moves_rows(d: archs.Target, shape: tuple) -> bool:
    """Whether the adapter's transform only picks and reorders rows, so it applies to rows of
    blocks as well (tried on a probe of one column: rows in, (rows, 1) out)."""
    if d.transform is None:
        return True
    try:
        out = d.transform(torch.zeros(*shape[:-1], 1))
    except (RuntimeError, IndexError):
        return False
    return out.dim() == 2 and out.shape[1] == 1


def _stored(f: GGUFFile, cfg, adapter) -> dict[str, set]:
    """Core module name -> the schemes its weight tensors' blocks are (None: not a packed layout)."""
    parts: dict[str, set] = {}
    for name in f.tensors:
        dests = adapter.gguf_targets(name, cfg)
        if not isinstance(dests, list):
            continue
        s = STORED.get(f.type_name(name))
        for d in (d for d in dests if not d.param.endswith(".bias")):
            module = d.param.removesuffix(".weight")
            parts.setdefault(module, set()).add(s if moves_rows(d, f.shapes[name]) else None)
    if cfg.tie_embeddings:
        parts["head"] = parts.get("embed", {None})
    return parts


def run_settings(f: GGUFFile, cfg, adapter, device, dtype, backend="auto", quantize: str | None = None) -> RunSettings:
    """As loader.settings, plus what the file's blocks decide. quantize None: Q4_0/Q4_1/Q8_0
    tensors as stored, quantize == 'as stored (Q4_1, Q8_0)'; 'none': all dequantized; a scheme:
    Q4_0/Q4_1 as stored if it is int4:g32, a Q8_0 head if it is int4 (the head is int8 in every
    mode: these blocks are int8 already), the rest quantized: 'int4:g32 (Q4_1, Q8_0 as stored)'."""
    asked = quant.parse(quantize)
    if quantize is not None and asked is None:
        return settings(device, dtype, backend, None)
    parts = _stored(f, cfg, adapter)
    one = {m: next(iter(s)) for m, s in parts.items() if len(s) == 1 and None not in s}
    if asked is None:
        schemes = one
    else:
        schemes = {"head": one["head"]} if asked.bits == 4 and one.get("head") == STORED["Q8_0"] else {}
    run = RunSettings(backend="torch", cpu_plan="blas", quantize=asked.name if asked else "as stored", schemes=schemes)
    params = destinations(build(cfg, torch.device("meta"), dtype, run))   # shapes only
    kept = sorted({f.type_name(n) for n in f.tensors if raw(f, n, cfg, adapter, params)})
    if not kept:
        return settings(device, dtype, backend, quantize)
    what = f"as stored ({', '.join(kept)})" if asked is None else f"{asked.name} ({', '.join(kept)} as stored)"
    return RunSettings(backend=pick_backend(backend, device), cpu_plan="blas", quantize=what,
                       schemes=schemes)


def raw(f: GGUFFile, name: str, cfg, adapter, params: dict) -> bool:
    """Whether tensor `name` loads as its own bytes: every place it goes is a packed module of its
    blocks' scheme, reached by moving rows."""
    dests, s = adapter.gguf_targets(name, cfg), STORED.get(f.type_name(name))
    return (s is not None and isinstance(dests, list) and bool(dests) and
            all(isinstance(params.get(d.param), quant.Packed) and params[d.param].scheme == s
                and params[d.param].kernel and moves_rows(d, f.shapes[name]) for d in dests))


def _fill_raw(dest: quant.Packed, d: archs.Target, t: torch.Tensor, kind: str, name: str, shape: tuple,
              seen: dict) -> int:
    """As loader._fill, for rows of blocks (t: uint8 (*rows, bytes) of a tensor of this shape in
    values); -> the number of values filled."""
    key = (d.param, d.index, d.rows)
    if key in seen:
        raise LoadError(f"tensors {seen[key]!r} and {name!r} both fill the same place ({d.param})")
    seen[key] = name
    lead = tuple(dest.shape[:-2]) if d.index is None else ()      # a whole stack of experts
    r0, r1 = d.rows or (0, dest.N)
    want = (*lead, min(r1, dest.N) - r0, dest.K // 32 * BLOCKS[kind][2])
    try:
        t = d.transform(t) if d.transform is not None else t
    except (RuntimeError, IndexError):       # an un-permute or per-head split cannot take these rows
        t = None
    if t is None or tuple(t.shape) != want:
        raise LoadError(f"tensor {name!r} has shape {shape}, expected {(*want[:-1], dest.K)}")
    for e, rows in (enumerate(t) if lead else [(d.index, t)]):
        dest.fill_raw(e, d.rows, blocks(rows, kind))
    return math.prod(want[:-1]) * dest.K


def load_weights(model, adapter, f: GGUFFile, progress: bool | None = None):
    """Strict, as loader.load_weights: every tensor goes somewhere (or is ignored by the adapter),
    every parameter is filled exactly once, every shape is checked."""
    cfg = model.cfg
    params = destinations(model)
    filled, seen = dict.fromkeys(params, 0), {}
    bar = progress_bar(sum(n for _, n in f.tensors.values()), progress)
    for name in f.tensors:
        if bar:
            bar.update(f.tensors[name][1])   # (offset, nbytes)
        dests = adapter.gguf_targets(name, cfg)
        if dests == archs.IGNORE:
            continue
        if not dests or any(d.param not in params for d in dests):
            raise LoadError(f"unexpected tensor {name!r} in {f.path.name}: the {cfg.arch} model has no place for it")
        if raw(f, name, cfg, adapter, params):    # the file's own blocks, as they are
            t, kind = f.read_raw(name), f.type_name(name)
            for d in dests:
                filled[d.param] += _fill_raw(params[d.param], d, t, kind, name, f.shapes[name], seen)
            continue
        w = f.read(name)
        for d in dests:
            try:
                filled[d.param] += _fill(params[d.param], d, w, name, seen)
            except (RuntimeError, IndexError):   # an adapter's transform (un-permute, per head) cannot take it
                raise LoadError(f"tensor {name!r} has shape {tuple(w.shape)}, which does not fit {d.param} "
                                f"{tuple(params[d.param].shape)}") from None
    if bar:
        bar.close()
    for name, p in params.items():
        if filled[name] != p.numel():
            want = expected(adapter, cfg, name, f.shapes)
            raise LoadError(f"missing tensor {want!r} in {f.path.name} (for {name})" if want else
                            f"parameter {name!r} is {filled[name]} of {p.numel()} values filled by {f.path.name}")
    weights_loaded(model)


# llama.cpp's per-layer tensor names (gguf.TENSOR_NAMES), the ones the adapters read, plain before fused
LAYER_NAMES = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "ffn_norm",
               "ffn_gate", "ffn_up", "ffn_down", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa",
               "attn_kv_a_norm", "attn_k_b", "attn_v_b", "ffn_gate_inp", "exp_probs_b", "ffn_gate_exps",
               "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "attn_qkv")
TOP_NAMES = ("token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight")


def expected(adapter, cfg, param: str, present: dict) -> str | None:
    """The llama.cpp name of a tensor the file lacks that would fill `param` (for the error)."""
    m = re.match(r"layers\.(\d+)\.", param)
    names = TOP_NAMES if not m else [f"blk.{m[1]}.{n}.{kind}" for n in LAYER_NAMES for kind in ("weight", "bias")]
    for name in names:
        dests = adapter.gguf_targets(name, cfg) if name not in present else None
        if isinstance(dests, list) and any(d.param == param for d in dests):
            return name
    return None


def load_model(path: Path, device: torch.device, dtype: torch.dtype | None, backend: str = "auto",
               quantize: str | None = None, progress: bool | None = None):
    """-> (Decoder, Tokenizer or None, config.json-like dict). dtype None: locate.default_dtype."""
    from .gguf_tokenizer import from_metadata
    f = GGUFFile(path)
    cfg, hf, adapter = config(f)
    dtype = dtype or default_dtype(device, cfg.torch_dtype)
    model = build(cfg, device, dtype, run_settings(f, cfg, adapter, device, dtype, backend, quantize))
    load_weights(model, adapter, f, progress)
    try:
        tokenizer = from_metadata(f.meta, f.path.name, Tokenizer) if "tokenizer.ggml.model" in f.meta else None
    except TokenizerError as e:
        raise LoadError(str(e)) from None
    return model, tokenizer, hf


def transformers_reads(llm) -> str | None:
    """None where transformers' GGUF reader gets this file right, else why not (verify's reference)."""
    meta = GGUFFile(llm.path).meta
    arch, cfg = meta["general.architecture"], llm.config
    if arch == "deepseek2":
        return "transformers has no GGUF reader for deepseek2"
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind == "freq_factors":
        return "transformers' GGUF reader ignores rope_freqs (Llama 3.x's llama3 rope scaling)"
    if kind is not None:   # 5.24 rebuilds rope.scaling.* for gpt-oss only
        return f"transformers' GGUF reader ignores rope.scaling.type {kind} for {arch}"
    if arch == "qwen3" and cfg.head_dim != 128:
        return "transformers' GGUF reader takes Qwen3's head_dim from its config default (128), not key_length"
    if arch == "gpt2" and cfg.max_position != 1024:
        return "transformers' GGUF reader reads GPT-2's context_length as n_ctx, leaving n_positions at 1024"
    return None

"""From a folder or hub id to a Decoder with every parameter filled.

A parameter that is the checkpoint's bytes as they stand (same dtype and layout) is a view of the
mmapped file, as in transformers (file_views); the others stream tensor by tensor out of the
mmapped safetensors, converted on the way, into parameters allocated without initialisation: peak
memory stays near one copy. Loading is strict: each checkpoint tensor goes somewhere or is
deliberately ignored by the adapter, each parameter (each row of a fused one) is filled exactly
once, each shape is checked.
"""
from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minillm import archs

from . import cpu, quant
from .config import Config, RunSettings
from .errors import UsageError
from .locate import LoadError, default_dtype
from .model import Decoder

BACKENDS = ("auto", "torch", "triton")


def pick_backend(backend: str, device: torch.device) -> str:
    """"auto": the Triton kernels on CUDA when triton is there, else torch."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    from minillm.kernels import triton_available
    ok, why = triton_available()
    if not ok:
        if backend == "auto":
            return "torch"
        raise LoadError(f"backend 'triton' is not available here: {why}")
    return "triton"


def settings(device: torch.device, dtype: torch.dtype, backend: str = "auto",
             quantize: str | None = None) -> RunSettings:
    """How the model will run, decided before it is built: the backend, on CPU the matmul plan
    measured fastest here for this dtype (cpu.plan; moot for quantized weights), the quantization."""
    scheme = quant.parse(quantize)
    plan = cpu.plan(dtype) if device.type == "cpu" and not scheme else "blas"
    return RunSettings(backend=pick_backend(backend, device), cpu_plan=plan, quantize=quantize)


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise LoadError(f"no config.json in {path}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{file} is not valid JSON: {e}") from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise LoadError(f"{index.name} lists {missing[0]}, which is not in {path}")
        return [path / s for s in shards]
    single = path / "model.safetensors"   # preferred over other top-level files (e.g. consolidated.*)
    files = [single] if single.exists() else sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt*")) or (path / "pytorch_model.bin.index.json").exists():
            raise LoadError(f"{path} has only PyTorch pickle weights (.bin/.pt); minillm reads "
                            "safetensors (convert them: save_pretrained(..., safe_serialization=True))")
        raise LoadError(f"no *.safetensors weights in {path}")
    return files


def to_config(hf: dict) -> tuple[Config, object]:
    try:
        adapter = archs.pick(hf)
        return adapter.to_config(hf), adapter
    except (KeyError, ValueError, TypeError) as e:
        msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise LoadError(f"config.json: {msg}") from None


@contextmanager
def _no_init():
    """Module constructors initialise their parameters, which is wasted on ones about to be filled;
    worse, nn.init.normal_ on the meta device runs through torch._refs, whose first call imports
    torch._dynamo: 1.5 s of every cold start. So the init functions do nothing while we build."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def build(cfg: Config, device, dtype, run: RunSettings = RunSettings()) -> Decoder:
    """A Decoder whose parameters are allocated but not initialised (they are about to be filled)."""
    model = skeleton(cfg, dtype, run)
    allocate(model, device)
    return model


def skeleton(cfg: Config, dtype, run: RunSettings = RunSettings()) -> Decoder:
    """The Decoder on the meta device: shapes, dtypes and layouts, no storage. So the CPU plan's
    weight layouts cost nothing (set_cpu_plan): weights are allocated in their final layout."""
    with torch.device("meta"), _no_init():
        model = Decoder(cfg, run).to(dtype)
        for m in model.modules():   # what a module keeps in fp32 whatever the dtype (a router's bias)
            for p in getattr(m, "fp32_params", ()):
                if hasattr(m, p):
                    setattr(m, p, torch.nn.Parameter(getattr(m, p).float()))
            for p, dt in getattr(m, "kept_dtypes", {}).items():   # quantized weights' scales
                if hasattr(m, p):
                    setattr(m, p, torch.nn.Parameter(getattr(m, p).to(dt), requires_grad=False))
    return model.eval().requires_grad_(False)


def allocate(model: Decoder, device, views: dict | None = None):
    """model.to_empty(device), minus its meta-device empty_like (whose first call imports sympy:
    0.3 s of a cold start). On CPU every parameter and buffer not in `views` becomes a view into
    one allocation, in module order (the order decode streams them), put in 2 MiB pages once
    filled (weights_loaded). Then what is derived, not loaded, is recomputed (reset_buffers)."""
    if torch.device(device).type != "cpu":
        model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device))
        model.reset_buffers()
        return
    views = views or {}
    given = {id(p): views[n] for n, p in model.named_parameters() if n in views}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in given}
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    padded = {k: -(-n // 64) * 64 for k, n in nbytes.items()}               # 64-byte aligned
    arena = torch.empty(sum(padded.values()) + cpu.HUGE_PAGE, dtype=torch.uint8)
    at, out = cpu.huge_page_offset(arena), dict(given)
    for k, t in tensors.items():
        out[k] = arena[at:at + nbytes[k]].view(t.dtype).as_strided(t.shape, t.stride())
        at += padded[k]
    model._apply(lambda t: out[id(t)])
    model.reset_buffers()


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def file_views(model: Decoder, targets: dict[str, list], files: list[Path]) -> dict[str, torch.Tensor]:
    """The parameters that are a checkpoint's bytes as they stand -> views of the mmapped file,
    as transformers loads: no copy, so a load costs what reading the headers costs, the weights
    are paged in from the page cache by the first forward, and they are one copy in memory (the
    page cache's, shared between processes) instead of two. A parameter qualifies when its dtype
    is the file's, its layout the file's (out, in) (cpu.PLANS' "out_in"), no transform applies,
    and its tensors lie back to back in the file in row order: a whole tensor, or a fused gate|up,
    which safetensors' name order stores gate then up. q, k and v (stored k, o, q, v) and
    converted, transposed or quantized weights are copied as before (load_weights).
    The price is at decode: file pages are 4 KiB (a private file mapping gets no 2 MiB pages, and
    they lie wherever the page cache put them), 2-10% slower than the copy in 2 MiB pages
    (SmolLM2 and llama-125m, fp32 and bf16, interleaved). The copy costs ~0.2 s per 500 MB, so it
    pays after a few hundred tokens: a load that will serve (the server) copies (load_model's
    mmap=False). As with transformers, a file rewritten in place under a loaded model changes or
    breaks it (SIGBUS where it was truncated); the copy does not depend on the file."""
    params = {n: p for n, p in model.named_parameters() if not isinstance(p, quant.Packed)}
    parts: dict[str, list] = {}                  # core name -> [(rows, file, start, stop, shape)]
    for file in files:
        base, header = read_header(file)
        for name, (dtype, shape, start, stop) in header.items():
            dests = targets.get(name)
            if not dests or dests == archs.IGNORE or len(dests) != 1:
                continue
            d, p = dests[0], params.get(dests[0].param)
            if p is None or d.transform or d.index is not None or p.dtype != dtype or not p.is_contiguous():
                continue
            parts.setdefault(d.param, []).append((d.rows or (0, p.shape[0]), file, base + start, base + stop, shape))
    views, maps = {}, {}
    for name, ps in parts.items():
        p = params[name]
        ps.sort(key=lambda part: part[0])
        rows = [r for r, *_ in ps]
        if rows[0][0] != 0 or rows[-1][1] != p.shape[0] or any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
            continue                                 # not every row from one place (or overlaps): copied
        if any(a[1] != b[1] or a[3] != b[2] for a, b in zip(ps, ps[1:])):
            continue                                 # not back to back in one file
        if any(tuple(shape) != (r[1] - r[0], *p.shape[1:]) for r, _, _, _, shape in ps):
            continue                                 # a wrong shape: load_weights names it
        file, start, stop = ps[0][1], ps[0][2], ps[-1][3]
        if start % p.element_size():
            continue
        if file not in maps:
            maps[file] = torch.from_file(str(file), shared=False, size=file.stat().st_size, dtype=torch.uint8)
        views[name] = maps[file][start:stop].view(p.dtype).view(p.shape)
    return views


def read_header(file: Path) -> tuple[int, dict]:
    """A safetensors file's header (checkpoint_names has validated it): (where the data starts,
    {name: (dtype, shape, start, stop)}), offsets relative to the data; unknown dtypes left out."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return 8 + n, {k: (SAFETENSORS_DTYPES[v["dtype"]], v["shape"], *v["data_offsets"])
                   for k, v in header.items() if k != "__metadata__" and v["dtype"] in SAFETENSORS_DTYPES}


def weights_loaded(model: Decoder, views=()):
    """After the last weight is in: their CPU allocation (allocate's one storage, which holds every
    parameter but the file views) into 2 MiB pages (cpu.huge_pages_later), in a thread, so that a load
    does not wait ~1 s for the kernel's compaction (the weights are only read from now on:
    collapsing pages under readers is safe). Asked before the fill instead, every first touch
    faulted a 2 MiB page through that compaction, in the load. Not when file views hold most of
    the weights: the few left (q/k/v) gain less than the compaction costs whatever runs next
    (a second load right after was ~2x slower with it)."""
    sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    if sum(sizes[n] for n in views) > sum(sizes.values()) / 2:
        return
    p = next((p for n, p in model.named_parameters() if n not in views), None)
    if p is not None and p.is_cpu:
        cpu.huge_pages_later(torch.empty(0, dtype=torch.uint8).set_(p.untyped_storage()))


def checkpoint_names(files: list[Path]) -> dict[str, Path]:
    """Every tensor name in the checkpoint -> the file holding it (headers only)."""
    where = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                where.update(dict.fromkeys(f.keys(), file))
        except SafetensorError as e:
            raise LoadError(f"corrupt or truncated safetensors file {file}: {e}") from None
    return where


def check_names(adapter, cfg: Config, files: list[Path]) -> tuple[dict[str, Path], dict[str, list]]:
    """Before reading a byte: every tensor has a place, and every tensor the adapter expects
    (adapter.names) is there; both reported in the checkpoint's own names. -> (where each tensor
    is, checkpoint_names; where it goes, adapter.targets: a list of Targets or archs.IGNORE)."""
    where, dests = checkpoint_names(files), {}
    for name, file in where.items():
        if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") in where:
            continue                                # an FP8 weight's scales, read with it
        dests[name] = adapter.targets(name, cfg)
        if dests[name] is None:
            raise LoadError(f"unexpected tensor {name!r} in {file.name}: the {cfg.arch} model has no place for it")
    missing = [n for n in adapter.names(cfg, where) if n not in where]
    if missing:
        index = files[0].parent / "model.safetensors.index.json"
        shard = json.loads(index.read_text())["weight_map"].get(missing[0]) if index.exists() else None
        place = (f"{index.name} puts it in {shard}" if shard else
                 f"not in {files[0].name}" if len(files) == 1 else f"in none of the {len(files)} files")
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"missing tensor {missing[0]!r}{more}: {place}")
    return where, dests


def progress_bar(total_bytes: int, progress: bool | None = None):
    """The one loading bar (safetensors and GGUF alike): tqdm on stderr, by default only on a
    terminal and for more than 64 MiB of weights; None when there is none to show."""
    if progress is None:
        progress = total_bytes > 64 * 2**20 and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr)


def destinations(model: Decoder) -> dict:
    """Core name -> what a checkpoint tensor with that target is copied into: the parameters, but
    for quantized weights, which are filled by rows through their module (quant.sinks)."""
    owned = quant.owned(model)
    params = {n: p for n, p in model.named_parameters(remove_duplicate=True) if n not in owned}
    params.update(quant.sinks(model))
    return params


def load_weights(model: Decoder, adapter, files: list[Path], progress: bool | None = None,
                 fp8_block: tuple[int, int] | None = None, views=(), checked=None):
    """fp8_block: the checkpoint's FP8 block size (quantization_config.weight_block_size): each
    float8 `X.weight` is dequantised with its `X.weight_scale_inv`, which may sit in another shard.
    views: the parameters that are already the file's bytes (file_views): counted, not copied.
    checked: check_names' answer, when the caller has it."""
    cfg = model.cfg
    where, targets = checked or check_names(adapter, cfg, files)
    params = destinations(model)
    filled = {name: 0 for name in params}           # values filled so far
    seen: dict[tuple, str] = {}                    # (param, index, rows) -> the tensor that filled it
    bar = progress_bar(sum(f.stat().st_size for f in files), progress)
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") in where:
                        continue                    # read with its weight, below
                    dests = targets[name]
                    if dests == archs.IGNORE:
                        continue
                    if any(d.param not in params for d in dests):   # an adapter's bug, not the file's
                        raise LoadError(f"tensor {name!r} maps to {dests[0].param!r}, which the model lacks")
                    if len(dests) == 1 and dests[0].param in views:   # file_views checked its shape
                        n = _seen(dests[0], name, seen, f.get_slice(name).get_shape())
                        filled[dests[0].param] += n
                        if bar:
                            bar.update(n * views[dests[0].param].element_size())
                        continue
                    t = f.get_tensor(name)
                    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or name + "_scale_inv" in where:
                        scale = name + "_scale_inv"
                        t = dequantize_fp8(t, _read(where, scale, f, file), fp8_block, name)
                    for d in dests:
                        filled[d.param] += _fill(params[d.param], d, t, name, seen)
                    if bar:
                        bar.update(t.numel() * t.element_size())
        except SafetensorError as e:
            raise LoadError(f"corrupt or truncated safetensors file {file}: {e}") from None
    if bar:
        bar.close()
    for name, p in params.items():   # check_names saw every expected tensor: this is the adapter's check
        if filled[name] != p.numel():
            raise LoadError(f"parameter {name!r} is {filled[name]} of {p.numel()} values filled: "
                            f"the {cfg.arch} adapter's names and targets disagree")
    weights_loaded(model, views)


def _read(where: dict, name: str, f, file: Path) -> torch.Tensor | None:
    if name not in where:
        return None
    if where[name] == file:
        return f.get_tensor(name)
    with safe_open(where[name], framework="pt", device="cpu") as g:
        return g.get_tensor(name)


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor | None, block, name: str) -> torch.Tensor:
    """Block-wise FP8 (DeepSeek-V3): w = fp8 * scale_inv, one float32 scale per block of
    block[0] x block[1] values; the blocks at the right and bottom edges may be partial."""
    if not block or scale_inv is None or w.dim() != 2:
        why = ("config.json has no quantization_config.weight_block_size" if not block
               else "it has no weight_scale_inv" if scale_inv is None else f"it is {w.dim()}-D")
        raise LoadError(f"cannot dequantise {w.dtype} tensor {name!r}: {why}")
    (bo, bi), (rows, cols) = block, w.shape
    if tuple(scale_inv.shape) != (-(-rows // bo), -(-cols // bi)):
        raise LoadError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, expected one scale per "
                        f"{bo}x{bi} block of {tuple(w.shape)}")
    scale = scale_inv.float().repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
    return w.float() * scale                      # (rows, cols) fp32; the copy into the model casts


def _seen(d: archs.Target, name: str, seen: dict, shape) -> int:
    """Record that `name` fills d's place (once only); -> the number of values it has."""
    key = (d.param, d.index, d.rows)
    if key in seen:
        raise LoadError(f"tensors {seen[key]!r} and {name!r} both fill the same place ({d.param})")
    seen[key] = name
    return math.prod(shape)


def _fill(param: torch.Tensor, d: archs.Target, t: torch.Tensor, name: str, seen: dict) -> int:
    """Copy t into its destination; -> the number of values filled."""
    _seen(d, name, seen, t.shape)
    shape = tuple(t.shape)
    if d.transform is not None:
        t = d.transform(t)
    if isinstance(param, quant.Packed):   # quantized as it is copied, by rows
        want = param.shape[1:] if d.index is not None else param.shape
        want = (min(d.rows[1], want[0]) - d.rows[0], *want[1:]) if d.rows else want
        if tuple(t.shape) != tuple(want):
            raise LoadError(f"tensor {name!r} has shape {shape}, expected {tuple(want)}")
        param.fill(d.index, d.rows, t)
        return t.numel()
    dest = param if d.index is None else param[d.index]
    dest = dest[d.rows[0]:d.rows[1]] if d.rows else dest
    if tuple(t.shape) != tuple(dest.shape):
        want = (f"{tuple(dest.shape)}" if d.transform is None
                else f"one that the adapter turns into {tuple(dest.shape)}")
        raise LoadError(f"tensor {name!r} has shape {shape}, expected {want}")
    with torch.no_grad():
        dest.copy_(t)   # converts dtype and device on the way; the mmapped source is not kept
    return dest.numel()


def load_model(path: Path, device: torch.device, dtype: torch.dtype | None, backend: str = "auto",
               progress=None, quantize: str | None = None, mmap: bool = True) -> tuple[Decoder, dict]:
    """-> (Decoder, hf config dict). dtype None: locate.default_dtype. quantize: quant.parse.
    mmap: the weights that can be are views of the file (file_views), else all are copied;
    MINILLM_MMAP=0 or 1 overrides it."""
    mmap = {"0": False, "1": True}.get(os.environ.get("MINILLM_MMAP", ""), mmap)
    hf = read_config(path)
    cfg, adapter = to_config(hf)
    files = weight_files(path)
    dtype = dtype or default_dtype(device, cfg.torch_dtype)
    quant = hf.get("quantization_config")
    if quant and (quant.get("quant_method") != "fp8" or len(quant.get("weight_block_size") or ()) != 2):
        raise LoadError(f"config.json: unsupported quantization {quant.get('quant_method')!r} "
                        "(supported: fp8 with a 2-D weight_block_size, as DeepSeek-V3)")
    checked = check_names(adapter, cfg, files)
    model = skeleton(cfg, dtype, settings(device, dtype, backend, quantize))
    views = file_views(model, checked[1], files) if mmap and device.type == "cpu" else {}
    allocate(model, device, views)
    load_weights(model, adapter, files, progress, tuple(quant["weight_block_size"]) if quant else None,
                 views, checked)
    return model, hf

"""From a folder or hub id to a Decoder with every parameter filled.

Weights stream tensor by tensor out of mmapped safetensors, converted to the target dtype on the
way, into parameters allocated without initialisation: peak memory stays near one copy. Loading is
strict: each checkpoint tensor goes somewhere or is deliberately ignored by the adapter, each
parameter (each row of a fused one) is filled exactly once, each shape is checked.
"""
from __future__ import annotations

import json
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
    """A Decoder whose parameters are allocated but not initialised (they are about to be filled).
    Built on the meta device, so the CPU plan's weight layouts cost nothing (set_cpu_plan)."""
    with torch.device("meta"), _no_init():
        model = Decoder(cfg, run).to(dtype)
        for m in model.modules():   # what a module keeps in fp32 whatever the dtype (a router's bias)
            for p in getattr(m, "fp32_params", ()):
                if hasattr(m, p):
                    setattr(m, p, torch.nn.Parameter(getattr(m, p).float()))
            for p, dt in getattr(m, "kept_dtypes", {}).items():   # quantized weights' scales
                if hasattr(m, p):
                    setattr(m, p, torch.nn.Parameter(getattr(m, p).to(dt), requires_grad=False))
    allocate(model, device)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def allocate(model: Decoder, device):
    """model.to_empty(device), minus its meta-device empty_like (whose first call imports sympy:
    0.3 s of a cold start). On CPU every parameter and buffer becomes a view into one allocation,
    in module order (the order decode streams them), put in 2 MiB pages once filled (weights_loaded)."""
    if torch.device(device).type != "cpu":
        model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device))
        return
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}   # a tied one once
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    padded = {k: -(-n // 64) * 64 for k, n in nbytes.items()}               # 64-byte aligned
    arena = torch.empty(sum(padded.values()) + cpu.HUGE_PAGE, dtype=torch.uint8)
    at, views = cpu.huge_page_offset(arena), {}
    for k, t in tensors.items():
        views[k] = arena[at:at + nbytes[k]].view(t.dtype).as_strided(t.shape, t.stride())
        at += padded[k]
    model._apply(lambda t: views[id(t)])


def weights_loaded(model: Decoder):
    """After the last weight is in: their CPU allocation (allocate's one storage) into 2 MiB pages
    (cpu.huge_pages), in a thread, so that a load does not wait ~1 s for the kernel's compaction
    (the weights are only read from now on: collapsing pages under readers is safe). Asked before
    the fill instead, every first touch faulted a 2 MiB page through that compaction, in the load."""
    p = next(model.parameters(), None)
    if p is not None and p.is_cpu:
        import threading
        arena = torch.empty(0, dtype=torch.uint8).set_(p.untyped_storage())
        threading.Thread(target=cpu.huge_pages, args=(arena,), daemon=True).start()


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


def check_names(adapter, cfg: Config, where: dict[str, Path], files: list[Path]):
    """Before reading a byte: every tensor has a place, and every tensor the adapter expects
    (adapter.names) is there; both reported in the checkpoint's own names."""
    for name, file in where.items():
        if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") in where:
            continue                                # an FP8 weight's scales, read with it
        if adapter.targets(name, cfg) is None:
            raise LoadError(f"unexpected tensor {name!r} in {file.name}: the {cfg.arch} model has no place for it")
    missing = [n for n in adapter.names(cfg, where) if n not in where]
    if missing:
        index = files[0].parent / "model.safetensors.index.json"
        shard = json.loads(index.read_text())["weight_map"].get(missing[0]) if index.exists() else None
        place = (f"{index.name} puts it in {shard}" if shard else
                 f"not in {files[0].name}" if len(files) == 1 else f"in none of the {len(files)} files")
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"missing tensor {missing[0]!r}{more}: {place}")


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
                 fp8_block: tuple[int, int] | None = None):
    """fp8_block: the checkpoint's FP8 block size (quantization_config.weight_block_size): each
    float8 `X.weight` is dequantised with its `X.weight_scale_inv`, which may sit in another shard."""
    cfg = model.cfg
    where = checkpoint_names(files)
    check_names(adapter, cfg, where, files)
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
                    dests = adapter.targets(name, cfg)
                    if dests == archs.IGNORE:
                        continue
                    if any(d.param not in params for d in dests):   # an adapter's bug, not the file's
                        raise LoadError(f"tensor {name!r} maps to {dests[0].param!r}, which the model lacks")
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
    weights_loaded(model)


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


def _fill(param: torch.Tensor, d: archs.Target, t: torch.Tensor, name: str, seen: dict) -> int:
    """Copy t into its destination; -> the number of values filled."""
    key = (d.param, d.index, d.rows)
    if key in seen:
        raise LoadError(f"tensors {seen[key]!r} and {name!r} both fill the same place ({d.param})")
    seen[key] = name
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
               progress=None, quantize: str | None = None) -> tuple[Decoder, dict]:
    """-> (Decoder, hf config dict). dtype None: locate.default_dtype. quantize: quant.parse."""
    hf = read_config(path)
    cfg, adapter = to_config(hf)
    files = weight_files(path)
    dtype = dtype or default_dtype(device, cfg.torch_dtype)
    quant = hf.get("quantization_config")
    if quant and (quant.get("quant_method") != "fp8" or len(quant.get("weight_block_size") or ()) != 2):
        raise LoadError(f"config.json: unsupported quantization {quant.get('quant_method')!r} "
                        "(supported: fp8 with a 2-D weight_block_size, as DeepSeek-V3)")
    model = build(cfg, device, dtype, settings(device, dtype, backend, quantize))
    load_weights(model, adapter, files, progress, tuple(quant["weight_block_size"]) if quant else None)
    return model, hf

"""From a folder or hub id to a Decoder with every parameter filled.

Weights stream tensor by tensor out of mmapped safetensors, converted to the target dtype on the
way, into parameters allocated without initialisation: peak memory stays near one copy. Loading is
strict: each checkpoint tensor goes somewhere or is deliberately ignored by the adapter, each
parameter (each row of a fused one) is filled exactly once, each shape is checked.
"""
from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minillm import archs

from . import cpu
from .config import Config
from .model import Decoder


class LoadError(Exception):
    """A checkpoint that cannot be loaded; the message says which file or tensor and why."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# what a hub download fetches first: never .bin/.pth/.gguf duplicates of the weights
HUB_META = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "model.safetensors.index.json",
            "pytorch_model.bin.index.json"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).removeprefix("torch.") not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return DTYPES[str(dtype).removeprefix("torch.")]


def parse_device(device, available: bool = True) -> torch.device:
    """None: CUDA when available, else CPU. A device this machine cannot run on is a LoadError
    here, not a traceback from the first allocation (`available=False`: only the spelling)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoadError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise LoadError(f"device {str(device)!r} is not supported (use cpu, cuda or cuda:N)")
    if available and device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device found"
            raise LoadError(f"device {str(device)!r} is not available: {why}")
        if (device.index or 0) >= count:
            raise LoadError(f"device {str(device)!r} is not available: {count} CUDA device(s) here")
    return device


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, fetched (config, tokenizer, safetensors only)
    or found in the Hugging Face cache, honouring HF_HUB_OFFLINE and HF_HOME."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LoadError(f"{path} is a file; give the folder that holds config.json")
    name = str(name_or_path)
    if not HUB_ID.match(name):
        raise LoadError(f"no such folder: {name}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    try:
        path = Path(snapshot_download(name, allow_patterns=HUB_META))
        # then only the weights the checkpoint uses: the index's shards, else top-level safetensors
        index = path / "model.safetensors.index.json"
        shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
                  else ["*.safetensors"])
        return Path(snapshot_download(name, allow_patterns=shards, ignore_patterns=["*/*"]))
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise LoadError(f"no folder {name!r} here and no accessible hub model of that name "
                        f"({type(e).__name__})") from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise LoadError(f"model {name!r} is not a local folder and not in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}), and {why}") from None
    except Exception as e:  # network and HTTP errors of every kind
        raise LoadError(f"could not fetch {name!r} from the hub: {type(e).__name__}: {e}") from None


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


def build(cfg: Config, device, dtype) -> Decoder:
    """A Decoder whose parameters are allocated but not initialised (they are about to be filled)."""
    on_cpu = torch.device(device).type == "cpu"
    plan = cpu.PLANS[cpu.plan(dtype)] if on_cpu else None   # the measured fastest matmul layout/library
    with torch.device("meta"), _no_init():
        model = Decoder(cfg).to(dtype)
        for m in model.modules():   # what a module keeps in fp32 whatever the dtype (a router's bias)
            for p in getattr(m, "fp32_params", ()):
                if hasattr(m, p):
                    setattr(m, p, torch.nn.Parameter(getattr(m, p).float()))
        if plan:
            model.set_cpu_plan(*plan)
    allocate(model, device)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def allocate(model: Decoder, device):
    """model.to_empty(device), minus its meta-device empty_like (whose first call imports sympy:
    0.3 s of a cold start). On CPU every parameter and buffer becomes a view into one allocation,
    in module order (the order decode streams them) and in 2 MiB pages (cpu.huge_pages)."""
    if torch.device(device).type != "cpu":
        model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device))
        return
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}   # a tied one once
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    padded = {k: -(-n // 64) * 64 for k, n in nbytes.items()}               # 64-byte aligned
    arena = torch.empty(sum(padded.values()) + cpu.HUGE_PAGE, dtype=torch.uint8)
    at, views = cpu.huge_pages(arena), {}
    for k, t in tensors.items():
        views[k] = arena[at:at + nbytes[k]].view(t.dtype).as_strided(t.shape, t.stride())
        at += padded[k]
    model._apply(lambda t: views[id(t)])


def load_weights(model: Decoder, adapter, files: list[Path], progress: bool | None = None,
                 fp8_block: tuple[int, int] | None = None):
    """fp8_block: the checkpoint's FP8 block size (quantization_config.weight_block_size): each
    float8 `X.weight` is dequantised with its `X.weight_scale_inv`, which may sit in another shard."""
    cfg = model.cfg
    params = dict(model.named_parameters(remove_duplicate=True))
    filled = {name: 0 for name in params}           # values filled so far
    seen: set[tuple] = set()
    where = {}                                      # tensor name -> file, to find a weight's scale
    if fp8_block:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                where.update(dict.fromkeys(f.keys(), file))
    total = sum(f.stat().st_size for f in files)
    if progress is None:   # a bar only when loading takes more than a moment
        progress = total > 256 * 2**20 and sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr)
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") in where:
                        continue                    # read with its weight, below
                    dests = adapter.targets(name, cfg)
                    if dests == archs.IGNORE:
                        continue
                    if not dests or any(d.param not in params for d in dests):
                        raise LoadError(f"unexpected tensor {name!r} in {file.name}: "
                                        f"the {cfg.arch} model has no place for it")
                    t = f.get_tensor(name)
                    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or name + "_scale_inv" in where:
                        t = dequantize_fp8(t, _read(where, name + "_scale_inv", f, file), fp8_block, name)
                    for d in dests:
                        filled[d.param] += _fill(params[d.param], d, t, name, seen)
                    if bar:
                        bar.update(t.numel() * t.element_size())
        except SafetensorError as e:
            raise LoadError(f"corrupt or truncated safetensors file {file}: {e}") from None
    if bar:
        bar.close()
    for name, p in params.items():
        if filled[name] != p.numel():
            rows = filled[name] / (p.numel() // p.shape[0])
            what = "missing" if filled[name] == 0 else f"only {rows:g} of {p.shape[0]} rows filled for"
            raise LoadError(f"{what} parameter {name!r}: no checkpoint tensor maps to it"
                            if filled[name] == 0 else f"{what} parameter {name!r}")


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


def _fill(param: torch.Tensor, d: archs.Target, t: torch.Tensor, name: str, seen: set) -> int:
    """Copy t into its destination; -> the number of values filled."""
    key = (d.param, d.index, d.rows)
    if key in seen:
        at = d.param if d.index is None else f"{d.param}[{d.index}]"
        raise LoadError(f"tensor {name!r} fills {at} rows {d.rows}, already filled")
    seen.add(key)
    if d.transform is not None:
        t = d.transform(t)
    dest = param if d.index is None else param[d.index]
    dest = dest[d.rows[0]:d.rows[1]] if d.rows else dest
    if tuple(t.shape) != tuple(dest.shape):
        raise LoadError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(dest.shape)} "
                        f"for {d.param}")
    with torch.no_grad():
        dest.copy_(t)   # converts dtype and device on the way; the mmapped source is not kept
    return dest.numel()


def load_model(path: Path, device: torch.device, dtype: torch.dtype | None, progress=None):
    """-> (Decoder, hf config dict). dtype None: the checkpoint's own on GPU, float32 on CPU."""
    hf = read_config(path)
    cfg, adapter = to_config(hf)
    files = weight_files(path)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else DTYPES.get(cfg.torch_dtype or "", torch.float32)
    quant = hf.get("quantization_config")
    if quant and (quant.get("quant_method") != "fp8" or len(quant.get("weight_block_size") or ()) != 2):
        raise LoadError(f"config.json: unsupported quantization {quant.get('quant_method')!r} "
                        "(supported: fp8 with a 2-D weight_block_size, as DeepSeek-V3)")
    model = build(cfg, device, dtype)
    load_weights(model, adapter, files, progress, tuple(quant["weight_block_size"]) if quant else None)
    return model, hf

"""What a user passed as a model -> the local folder that holds it, and the dtype it runs in by
default. One place for these rules: api, cli, info, bench and verify all call `resolve` and
`default_dtype`.

    None              the embedded default model (minillm/models/minillm-pycode-5m)
    a folder          as is
    a hub id          user/repo: from the Hugging Face cache, else fetched (HF_HUB_OFFLINE and
                      HF_HOME honoured): metadata first, then only the weights the checkpoint uses
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import LoadError, UsageError

DEFAULT_MODEL = Path(__file__).parent / "models" / "minillm-pycode-5m"
# what a hub download fetches first: never .bin/.pth/.gguf duplicates of the weights
HUB_META = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "model.safetensors.index.json",
            "pytorch_model.bin.index.json", "chat_template.jinja", "chat_template.json"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve(model: str | os.PathLike | None, weights: bool = True) -> Path:
    """-> the folder holding config.json. `weights=False` fetches only a hub model's config.json
    (info reads the safetensors headers from the hub instead of downloading the weights)."""
    if model is None:
        if not DEFAULT_MODEL.exists():
            raise LoadError("this install has no embedded default model; pass a model folder or hub id")
        return DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LoadError(f"{path} is a file; give the folder that holds config.json")
    name = str(model)
    if not HUB_ID.match(name):
        raise LoadError(f"no such folder: {name}")
    import huggingface_hub as hub
    with hub_errors(name):
        if not weights:
            return Path(hub.hf_hub_download(name, "config.json")).parent
        path = Path(hub.snapshot_download(name, allow_patterns=HUB_META))
        # then only the weights the checkpoint uses: the index's shards, else top-level safetensors
        index = path / "model.safetensors.index.json"
        shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
                  else ["*.safetensors"])
        return Path(hub.snapshot_download(name, allow_patterns=shards, ignore_patterns=["*/*"]))


@contextmanager
def hub_errors(name: str):
    """huggingface_hub's exceptions -> one LoadError line saying what to do."""
    from huggingface_hub import constants, errors
    try:
        yield
    except LoadError:
        raise
    except (errors.GatedRepoError, errors.RepositoryNotFoundError) as e:
        raise LoadError(f"no folder {name!r} here and no accessible hub model of that name "
                        f"({type(e).__name__})") from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise LoadError(f"model {name!r} is not a local folder and not in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}), and {why}") from None
    except errors.EntryNotFoundError:
        raise LoadError(f"hub model {name!r} has no config.json") from None
    except Exception as e:  # network and HTTP errors of every kind
        raise LoadError(f"could not fetch {name!r} from the hub: {type(e).__name__}: {e}") from None


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).removeprefix("torch.") not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return DTYPES[str(dtype).removeprefix("torch.")]


def default_dtype(device: torch.device, saved: str | None) -> torch.dtype:
    """float32 on CPU (exact, and CPU bf16 products are not faster everywhere); on GPU the dtype
    the checkpoint was saved in (`saved`, config.json's torch_dtype), float32 if it says none."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return DTYPES.get(saved or "", torch.float32)


def parse_device(device, available: bool = True) -> torch.device:
    """None: CUDA when available, else CPU. A device this machine cannot run on is a LoadError
    here, not a traceback from the first allocation (`available=False`: only the spelling)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {str(device)!r} is not supported (use cpu, cuda or cuda:N)")
    if available and device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device found"
            raise LoadError(f"device {str(device)!r} is not available: {why}")
        if (device.index or 0) >= count:
            raise LoadError(f"device {str(device)!r} is not available: {count} CUDA device(s) here")
    return device

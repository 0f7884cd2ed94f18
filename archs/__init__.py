"""Architecture adapters: Hugging Face config.json -> core Config, HF tensor names -> core names.

Each adapter module defines
    MODEL_TYPES      the config.json `model_type`s it reads
    ARCHITECTURES    the `architectures` entries it reads
    to_config(hf: dict) -> Config
    targets(name: str, cfg: Config) -> list[Target] | IGNORE | None
        where a checkpoint tensor goes (a fused parameter takes several tensors, each into its
        rows); IGNORE for tensors deliberately dropped; None for a name it does not know (the
        loader reports it as unexpected: loading is strict).
    names(cfg: Config, present: dict) -> list[str]
        every tensor a complete checkpoint of this config has, in the checkpoint's own names (the
        loader reports the first one missing by that name; `present`, the names the checkpoint
        has, picks among layouts such as GPT-2's with and without the `transformer.` prefix).
and, for llama.cpp's GGUF files (minillm/gguf.py), beside them
    GGUF_ARCHS       the `general.architecture`s it reads
    from_gguf(meta: dict, shapes: dict[str, tuple], read) -> (Config, config.json-like dict)
        from the metadata, the tensor names and shapes (torch order), and read(name) -> tensor
    gguf_targets(name: str, cfg: Config)    as targets(), for llama.cpp's tensor names
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

IGNORE = "ignore"


@dataclass(frozen=True)
class Target:
    param: str                                    # core parameter name
    rows: tuple[int, int] | None = None           # [start, stop) along dim 0, for fused params
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    index: int | None = None                      # param[index] (one of stacked experts); rows within it


def rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either spelling: hub files say `rope_theta` + `rope_scaling` (with
    `type` or `rope_type`); transformers 5 writes one `rope_parameters` dict holding both."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind in ("linear", "llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings")
                          or hf.get("max_position_embeddings"))
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3, yarn)")
    return float(theta), (None if kind == "default" else {"rope_type": kind, **params})


def token_ids(hf: dict) -> dict:
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
    return {"bos_token_id": hf.get("bos_token_id"), "eos_token_ids": eos,
            "torch_dtype": hf.get("dtype") or hf.get("torch_dtype")}


def fused_rows(sizes: tuple[int, ...], index: int) -> tuple[int, int]:
    """Rows of part `index` in a parameter fused from parts of these sizes (q/k/v, gate/up)."""
    start = sum(sizes[:index])
    return start, start + sizes[index]


def gguf_fields(meta: dict, table: dict) -> dict:
    """config.json fields from GGUF metadata; `table` maps llama.cpp's key (after "<arch>.") to the field."""
    arch = meta["general.architecture"]
    return {hf: meta[f"{arch}.{key}"] for key, hf in table.items() if f"{arch}.{key}" in meta}


def gguf_rope(meta: dict) -> dict:
    """rope_parameters as transformers 5 spells them, from llama.cpp's rope keys (llama3 scaling is
    not among them: its converter stores it as the rope_freqs tensor, read by the llama adapter)."""
    get = lambda key, default=None: meta.get(f"{meta['general.architecture']}.rope.{key}", default)  # noqa: E731
    params = {"rope_theta": get("freq_base", 10000.0)}
    kind = get("scaling.type", "linear" if get("scale_linear") else "none")   # scale_linear: old files
    if kind == "linear":
        params.update(rope_type="linear", factor=get("scaling.factor") or get("scale_linear"))
    elif kind == "yarn":
        params.update(rope_type="yarn", factor=get("scaling.factor"),
                      original_max_position_embeddings=get("scaling.original_context_length"))
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                        ("yarn_attn_factor", "attention_factor")):
            if get(f"scaling.{key}") is not None:
                params[hf] = get(f"scaling.{key}")
    elif kind != "none":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: none, linear, yarn, llama3 rope_freqs)")
    return params


# tokens llama.cpp ends generation on whatever the eos id says (llama-vocab.cpp, special_eog_ids)
EOG_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
              "<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


def gguf_token_ids(meta: dict) -> dict:
    """bos and the end-of-generation ids: eos, eot, eom, and the tokens llama.cpp treats as such."""
    get = lambda key: meta.get(f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos = [get(k) for k in ("eos", "eot", "eom") if get(k) is not None]
    eos += [i for i, t in enumerate(tokens) if t in EOG_TOKENS]
    return {"bos_token_id": get("bos"), "eos_token_id": sorted(set(eos))}


from . import deepseek, gpt2, llama, qwen3  # noqa: E402  (the registry below needs the helpers above)

ADAPTERS = [gpt2, llama, qwen3, deepseek]


def supported() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.MODEL_TYPES)


def pick(hf: dict):
    """The adapter for a config.json: by `model_type`, else by `architectures`."""
    model_type = hf.get("model_type")
    for adapter in ADAPTERS:
        if model_type in adapter.MODEL_TYPES:
            return adapter
    for arch in hf.get("architectures") or []:
        for adapter in ADAPTERS:
            if arch in adapter.ARCHITECTURES:
                return adapter
    name = model_type or ", ".join(hf.get("architectures") or []) or "(none given)"
    raise ValueError(f"unknown architecture {name!r}; supported model types: {', '.join(supported())}")


def gguf_supported() -> list[str]:
    return sorted(a for adapter in ADAPTERS for a in getattr(adapter, "GGUF_ARCHS", ()))


def pick_gguf(arch: str):
    """The adapter for a GGUF file's `general.architecture`."""
    for adapter in ADAPTERS:
        if arch in getattr(adapter, "GGUF_ARCHS", ()):
            return adapter
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(gguf_supported())}")


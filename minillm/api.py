"""The Python API: `minillm.load(...)` -> LLM with .logits, .generate, .stream."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import Config
from .generate import Sampling, run
from .loader import load_model
from .locate import LoadError, parse_device, parse_dtype, resolve
from .model import Decoder
from .tokenizer import Tokenizer, TokenizerError

@dataclass
class GenerationResult:
    text: str                 # the new text (eos and the stop string not included)
    token_ids: list[int]      # the new token ids (an eos that ended it included, as transformers)
    finish_reason: str        # "eos" | "stop" | "length"


class LLM:
    def __init__(self, model: Decoder, tokenizer: Tokenizer | None, path: Path, hf_config: dict,
                 generation_config: dict):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.hf_config, self.generation_config = hf_config, generation_config
        gc_eos = generation_config.get("eos_token_id")
        gc_eos = [] if gc_eos is None else (gc_eos if isinstance(gc_eos, list) else [gc_eos])
        self.eos_token_ids = sorted(set(self.config.eos_token_ids) | set(gc_eos))

    def __repr__(self) -> str:
        run = self.model.run
        return (f"LLM(path={str(self.path)!r}, arch={self.config.arch!r}, dtype={str(self.dtype).removeprefix('torch.')}, "
                f"device={str(self.device)!r}, backend={run.backend!r}, cpu_plan={run.cpu_plan!r})")

    @property
    def config(self) -> Config:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.path} has no tokenizer.json: pass token ids, not text")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        self._check_ids(ids)
        return ids

    def _check_ids(self, ids):
        """Token ids outside the vocabulary: a ValueError naming one, not the embedding's IndexError."""
        V = self.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{V - 1})")

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) float32 logits of a full forward (no cache)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.config.vocab_size:
            self._check_ids(ids.flatten().tolist())
        return self.model(ids).float()

    def _settings(self, temperature, top_k, top_p, min_p, repetition_penalty) -> Sampling:
        """What the caller left out comes from generation_config.json, then greedy."""
        gc = self.generation_config
        if temperature is None:
            temperature = gc.get("temperature", 1.0) if gc.get("do_sample") else 0.0
        pick = lambda v, key: v if v is not None else gc.get(key)  # noqa: E731
        return Sampling(float(temperature or 0.0), pick(top_k, "top_k"), pick(top_p, "top_p"),
                        pick(min_p, "min_p"), pick(repetition_penalty, "repetition_penalty"))

    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
             seed, stop):
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        sampling = self._settings(temperature, top_k, top_p, min_p, repetition_penalty)
        ids = [self.encode(p) for p in prompts]
        return run(self.model, self.tokenizer, ids, max_new_tokens, sampling,
                   set(self.eos_token_ids), stop, seed)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None, stop=None):
        """One prompt (str or list[int]) -> GenerationResult; a list of prompts -> a list."""
        batch = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)
        prompts = list(prompt) if batch else [prompt]
        for seqs in self._run(prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                              repetition_penalty, seed, stop):
            pass
        results = [GenerationResult(s.text, s.tokens, s.finish_reason) for s in seqs]
        return results if batch else results[0]

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop=None) -> Iterator[str]:
        """Text pieces of one prompt's completion as they are decoded (whole characters only)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: streaming needs one")
        for (seq,) in self._run([prompt], max_new_tokens, temperature, top_k, top_p, min_p,
                                repetition_penalty, seed, stop):
            piece = seq.ready_text()
            if piece:
                yield piece


def load(name_or_path: str | Path | None = None, device=None, dtype=None, backend: str = "auto",
         progress: bool | None = None) -> LLM:
    """A local folder or a hub id (None: the embedded default model) -> LLM.

    device None: CUDA when available, else CPU. dtype None: the checkpoint's own on GPU,
    float32 on CPU; or a torch.dtype / "float32" | "bfloat16" | "float16". backend "auto":
    the Triton kernels on CUDA, torch elsewhere. What was decided is in `llm.model.run`."""
    device, dtype = parse_device(device), parse_dtype(dtype)
    path = resolve(name_or_path)
    try:
        tokenizer = Tokenizer.from_dir(path)
    except TokenizerError as e:
        raise LoadError(str(e)) from None
    model, hf = load_model(path, device, dtype, backend, progress)
    gc_file = path / "generation_config.json"
    gc = json.loads(gc_file.read_text()) if gc_file.exists() else {}
    return LLM(model, tokenizer, path, hf, gc)

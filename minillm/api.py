"""The Python API: `minillm.load(...)` -> LLM with .logits, .generate, .stream."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch

from . import quant
from .config import Config
from .engine import Engine, EngineSettings, SamplingParams
from .errors import UsageError
from .generate import Sampling, heal, run
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
                f"device={str(self.device)!r}, backend={run.backend!r}, cpu_plan={run.cpu_plan!r}"
                + (f", quantize={run.quantize!r})" if run.quantize else ")"))

    @property
    def config(self) -> Config:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

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
            raise UsageError(f"token id {bad} is outside the vocabulary (0..{V - 1})")

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

    @cached_property
    def engine(self) -> Engine:
        """The serving engine (minillm.engine) that generate, stream and chat run on; its KV
        pool is allocated on first use (new_engine sets its size)."""
        return Engine(self.model, self.tokenizer, set(self.eos_token_ids))

    def new_engine(self, **settings) -> Engine:
        """Replace the engine with one of these EngineSettings (block_size, num_blocks, kv_memory,
        max_running, max_step_tokens); its prefix cache starts empty."""
        self.engine = Engine(self.model, self.tokenizer, set(self.eos_token_ids), EngineSettings(**settings))
        return self.engine

    def _run(self, prompts, max_new_tokens, temperature=None, top_k=None, top_p=None, min_p=None,
             repetition_penalty=None, seed=None, stop=None, eos=None, cache=None, start=0,
             token_healing=False):
        """Yields the prompts' Sequences after each step. On the engine, except where a caller
        brings its own contiguous cache (ChatSession)."""
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if "" in stop:   # would match at once: nothing generated, and no error to say why
            raise UsageError("an empty stop string would stop before the first token")
        sampling = self._settings(temperature, top_k, top_p, min_p, repetition_penalty)
        ids = [self.encode(p) for p in prompts]
        heals = [heal(self.tokenizer, i) if isinstance(p, str) and (
            token_healing or (token_healing is None and p.endswith((" ", "\t")))) else None
            for p, i in zip(prompts, ids)]
        ids = [h.ids if h else i for h, i in zip(heals, ids)]
        if cache is not None:
            return run(self.model, self.tokenizer, ids, max_new_tokens, sampling,
                       set(self.eos_token_ids) if eos is None else eos, stop, seed, cache, start, heals)
        if max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        params = SamplingParams(**vars(sampling), max_tokens=max_new_tokens, seed=seed, stop=stop,
                                eos=set(self.eos_token_ids) if eos is None else set(eos))
        return ([r.seq for r in reqs] for reqs in self.engine.run(ids, params, heals))

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None, stop=None,
                 token_healing: bool | None = None):
        """One prompt (str or list[int]) -> GenerationResult; a list of prompts -> a list.
        token_healing (generate.Heal): None heals text prompts that end in a space or tab (they
        end mid-token), True any text prompt, False none."""
        batch = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)
        prompts = list(prompt) if batch else [prompt]
        for seqs in self._run(prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                              repetition_penalty, seed, stop, token_healing=token_healing):
            pass
        results = [GenerationResult(s.text, s.tokens, s.finish_reason) for s in seqs]
        return results if batch else results[0]

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop=None, token_healing: bool | None = None) -> Iterator[str]:
        """Text pieces of one prompt's completion as they are decoded (whole characters only)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: streaming needs one")
        for (seq,) in self._run([prompt], max_new_tokens, temperature, top_k, top_p, min_p,
                                repetition_penalty, seed, stop, token_healing=token_healing):
            piece = seq.ready_text()
            if piece:
                yield piece

    # -- chat ---------------------------------------------------------------------------------

    @cached_property
    def chat_template(self) -> ChatTemplate | None:
        """The checkpoint's chat template (None where it has none); assign a ChatTemplate to replace it."""
        from .chat import ChatTemplate   # jinja2: imported when a template is wanted (~0.1 s of a cold start)
        return ChatTemplate.from_dir(self.path) if self.path.is_dir() else None

    def _template(self, chat_template: str | None) -> ChatTemplate:
        from .chat import ChatTemplate, ChatTemplateError, special_tokens
        if self.chat_template is not None:
            return self.chat_template
        if chat_template is None:
            raise ChatTemplateError(
                f"{self.path} has no chat template (no chat_template.jinja, chat_template.json or chat_template "
                "in tokenizer_config.json): give one with chat_template=TEXT_OR_FILE (CLI: --chat-template FILE)")
        return ChatTemplate({}, special_tokens(self.path) if self.path.is_dir() else {})

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None, tokenize: bool = False,
                            chat_template: str | None = None, **template_kwargs):
        """messages -> the rendered prompt (str), or with tokenize=True its token ids, as transformers'
        tokenizer.apply_chat_template gives them (special tokens parsed, no BOS added twice)."""
        text = self._template(chat_template).render(messages, add_generation_prompt, tools,
                                                    chat_template=chat_template, **template_kwargs)
        if not tokenize:
            return text
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: tokenize=True needs one")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat_eos(self, chat_template: str | None = None) -> set[int]:
        """The eos ids plus the template's end-of-turn token (ChatTemplate.end_of_turn)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: chat needs one")
        special = {t: i for t, i in self.tokenizer.special_tokens().items() if i < self.config.vocab_size}
        eot = self._template(chat_template).end_of_turn(special, chat_template)
        return set(self.eos_token_ids) | ({eot} if eot is not None else set())

    def _chat(self, messages, max_new_tokens, sampling: dict, tools, chat_template, template_kwargs):
        ids = self.apply_chat_template(messages, True, tools, True, chat_template, **template_kwargs)
        return self._run([ids], max_new_tokens, **sampling, eos=self.chat_eos(chat_template))

    def chat(self, messages, max_new_tokens: int = 256, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, stop=None, tools=None, chat_template: str | None = None,
             **template_kwargs) -> GenerationResult:
        """The assistant's reply to `messages` (rendered with the chat template) as a GenerationResult;
        it ends at an eos id or the template's end-of-turn token (finish_reason "eos")."""
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, seed=seed, stop=stop)
        for (seq,) in self._chat(messages, max_new_tokens, sampling, tools, chat_template, template_kwargs):
            pass
        return GenerationResult(seq.text, seq.tokens, seq.finish_reason)

    def stream_chat(self, messages, max_new_tokens: int = 256, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float | None = None, seed: int | None = None, stop=None, tools=None,
                    chat_template: str | None = None, **template_kwargs) -> Iterator[str]:
        """The reply of chat() as text pieces (whole characters)."""
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, seed=seed, stop=stop)
        for (seq,) in self._chat(messages, max_new_tokens, sampling, tools, chat_template, template_kwargs):
            piece = seq.ready_text()
            if piece:
                yield piece


class ChatSession:
    """A conversation that keeps its KV cache between turns. Each turn renders the whole history,
    keeps the cache for the longest token prefix the new render shares with what the cache holds,
    and prefills only the rest: the new user turn where the render extends the previous one, more
    where the template re-renders earlier turns differently (Qwen3 drops old <think> blocks)."""

    def __init__(self, llm: LLM, system: str | None = None, chat_template: str | None = None, **template_kwargs):
        self.llm, self.system, self.chat_template, self.kwargs = llm, system, chat_template, template_kwargs
        llm._template(chat_template).check(chat_template)   # no template, or one that does not parse: fail now
        self.eos = llm.chat_eos(chat_template)
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache, self.cached = None, []   # the tokens whose K/V the cache holds, in order
        self.prefilled = 0                   # tokens the last turn computed in its prefill

    def _fit(self, keep: int, need: int):
        """A cache of at least `need` slots holding the first `keep` cached tokens."""
        if self.cache is not None and self.cache.max_len >= need:
            return
        size = min(self.llm.config.max_position, max(need, 2 * (self.cache.max_len if self.cache else 0)))
        new = self.llm.model.new_cache(1, size)
        if self.cache is not None:
            for name, t in self.cache.tensors.items():    # (layers, 1, max_len, ...)
                new.tensors[name][:, :, :keep] = t[:, :, :keep]
        self.cache = new

    def send(self, text: str, max_new_tokens: int = 512, **sampling) -> Iterator[str]:
        """One user turn: streams the reply's text; history and cache are updated even if the
        caller stops reading (Ctrl-C), with the reply so far."""
        self.messages.append({"role": "user", "content": text})
        seq, keep = None, len(self.cached)
        try:
            prompt = self.llm.apply_chat_template(self.messages, tokenize=True, chat_template=self.chat_template,
                                                  **self.kwargs)
            keep = 0
            while keep < min(len(self.cached), len(prompt) - 1) and self.cached[keep] == prompt[keep]:
                keep += 1
            self._fit(keep, min(self.llm.config.max_position, len(prompt) + max_new_tokens))
            self.prefilled = len(prompt) - keep
            for (seq,) in self.llm._run([prompt], max_new_tokens, **sampling, eos=self.eos, cache=self.cache,
                                        start=keep):
                piece = seq.ready_text()
                if piece:
                    yield piece
        finally:
            if seq is None:      # nothing generated (an error, or stopped in the prefill): no turn
                self.messages.pop()
                self.cached = self.cached[:keep]     # a prefill writes from `keep` on
            else:
                self.cached = prompt + seq.tokens[:-1]   # the last token was sampled, never forwarded
                self.messages.append({"role": "assistant", "content": seq.text})


def load(name_or_path: str | Path | None = None, device=None, dtype=None, backend: str = "auto",
         progress: bool | None = None, quantize: str | None = None, mmap: bool = True) -> LLM:
    """A local folder, a hub id, a GGUF file (or a folder holding one) or None (the embedded default
    model) -> LLM.

    device None: CUDA when available, else CPU. dtype None: the checkpoint's own on GPU,
    float32 on CPU; or a torch.dtype / "float32" | "bfloat16" | "float16". backend "auto":
    the Triton kernels on CUDA, torch elsewhere. quantize: "int8" | "int4" | "int4:g64" |
    "int4:g128", weight-only, at load (minillm.quant); None: unquantized, but for a GGUF file its
    Q4_0/Q4_1/Q8_0 tensors as stored ("none": all dequantized; minillm/gguf.py). mmap (safetensors
    on CPU): the weights whose bytes the file holds as they will run are views of the mmapped file,
    no copy, as transformers loads; mmap=False copies every one into one allocation in 2 MiB
    pages: ~0.2 s more per 500 MB of weights, 2-10% faster decode (loader.file_views; the server
    loads so). What was decided is in `llm.model.run`."""
    device, dtype = parse_device(device), parse_dtype(dtype)
    quant.parse(quantize)                         # a bad name fails before anything is read
    from . import gguf
    if (file := gguf.find(name_or_path)) is not None:   # llama.cpp's format: minillm/gguf.py
        model, tokenizer, hf = gguf.load_model(file, device, dtype, backend, quantize, progress)
        llm = LLM(model, tokenizer, file, hf, {})
        if tokenizer is not None and tokenizer.chat_template:   # the metadata's tokenizer.chat_template
            from .chat import ChatTemplate
            named = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
            llm.chat_template = ChatTemplate({"default": tokenizer.chat_template},
                                             {k: v for k, v in named.items() if v is not None},
                                             f"{file.name} (tokenizer.chat_template)")
        return llm
    path = resolve(name_or_path)
    try:
        tokenizer = Tokenizer.from_dir(path)
    except TokenizerError as e:
        raise LoadError(str(e)) from None
    model, hf = load_model(path, device, dtype, backend, progress, quantize, mmap)
    gc_file = path / "generation_config.json"
    gc = json.loads(gc_file.read_text()) if gc_file.exists() else {}
    return LLM(model, tokenizer, path, hf, gc)

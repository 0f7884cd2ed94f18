"""The generation loop: prefill the prompts, then decode one token per sequence per step.

Prompts of different lengths are right-padded into one batch: causal attention keeps a prompt's
tokens from seeing the padding after them, and each sequence then decodes at its own position
(its own slot in the preallocated cache), so nothing is shifted and RoPE positions stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UsageError
from .model import Decoder
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class Sampling:
    temperature: float = 0.0         # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self):
        # transformers' ranges (0 / None switch a processor off), checked so that a typo is an
        # error rather than a quietly different distribution (temperature -1 inverts it)
        for name, ok, want in (("temperature", self.temperature >= 0, ">= 0 (0: greedy)"),
                               ("top_k", self.top_k is None or self.top_k >= 0, ">= 0 (0: off)"),
                               ("top_p", self.top_p is None or 0 < self.top_p <= 1, "in (0, 1]"),
                               ("min_p", self.min_p is None or 0 <= self.min_p <= 1, "in [0, 1]"),
                               ("repetition_penalty", self.repetition_penalty is None or self.repetition_penalty > 0,
                                "> 0 (1: off)")):
            if not ok:
                raise UsageError(f"{name} must be {want}, got {getattr(self, name)}")


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) the first index of each row's largest value (NaN counts as largest),
    as torch.argmax. On CPU through numpy: torch's CPU argmax over a 49k vocabulary row takes
    ~85 us here, numpy's ~4, and a greedy decode step pays it every token."""
    if logits.is_cpu:   # 16-bit values widen to fp32 exactly: the same maxima
        return torch.from_numpy(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).numpy().argmax(-1))
    return logits.argmax(-1)


def next_tokens(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None, gen) -> torch.Tensor:
    """logits (B, V) -> (B,) token ids. The processors run in transformers' order: repetition
    penalty, then temperature, top-k, top-p, min-p; each with transformers' semantics."""
    logits = logits.float()
    if s.repetition_penalty and s.repetition_penalty != 1.0 and seen is not None:
        prev = logits.gather(1, seen)
        prev = torch.where(prev < 0, prev * s.repetition_penalty, prev / s.repetition_penalty)
        logits = logits.scatter(1, seen, prev)
    if not s.temperature:
        return argmax(logits)
    logits = logits / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        # drop the least likely tokens whose total mass stays below 1 - top_p (keep >= 1 token)
        sorted_logits, order = logits.sort(dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if s.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


@dataclass
class Heal:
    """Token healing (transformers' `token_healing`, after Microsoft's Guidance): a prompt that ends
    mid-token ("def " ends in a lone space, which the model almost never saw alone: in training the
    space belongs to the next word, " fibonacci") is backed up by its last token, and the first new
    token must be one whose text extends the removed text. That text is the prompt's, so it is
    dropped from the output: "def " + "fibonacci(n):" rather than "def " + " + 1"."""
    ids: list[int]               # the prompt without its last token
    tail: str                    # the removed token's text
    allowed: list[int]           # first tokens whose text starts with `tail`
    context: list[int]           # the token before, for decoders that look back (sentencepiece)


def only(logits: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    """logits (V,) with every id outside `allowed` at -inf: a healed prompt's first new token."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[allowed] = True
    return logits.masked_fill(~keep, float("-inf"))


def heal(tokenizer: Tokenizer, ids: list[int]) -> Heal | None:
    """-> how to heal this prompt's end, or None where it cannot be (one token, a partial character)."""
    if len(ids) < 2:
        return None
    ctx = ids[-2:-1]               # one token of context keeps each candidate's text as it reads in place
    base = tokenizer.decode(ctx)
    whole = tokenizer.decode(ctx + ids[-1:])
    tail = whole[len(base):]
    if not whole.startswith(base) or not tail or "\ufffd" in tail:
        return None
    texts = tokenizer.tok.decode_batch([ctx + [c] for c in range(tokenizer.tok.get_vocab_size())])
    allowed = [c for c, t in enumerate(texts) if t.startswith(base) and t[len(base):].startswith(tail)]
    return Heal(ids[:-1], tail, allowed, ctx) if allowed else None


@dataclass
class Sequence:
    """One prompt's progress: its new tokens, their text so far, and why it stopped."""
    prompt: list[int]
    decoder: StreamDecoder | None
    stop: list[str]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0                  # characters of text handed out by stream()
    finish_reason: str | None = None
    heal: str = ""                    # text the first tokens repeat from the prompt (Heal.tail)

    def add(self, token: int, eos: set[int]):
        self.tokens.append(token)
        if token in eos:
            self.finish_reason = "eos"
            return
        if self.decoder is not None:
            self.text += self.decoder.push(token)
            if self.heal and self.text.startswith(self.heal):
                self.text, self.heal = self.text[len(self.heal):], ""
            for s in self.stop:
                if s in self.text:
                    self.text = self.text[:self.text.index(s)]
                    self.finish_reason = "stop"

    def finish(self, reason: str):
        self.finish_reason = self.finish_reason or reason
        if self.decoder is not None and self.finish_reason != "stop":
            self.text += self.decoder.flush()

    def ready_text(self) -> str:
        """Text that can be streamed now: all of it once finished, else all but what might be
        the start of a stop string."""
        end = len(self.text)
        if self.finish_reason is None and self.stop:
            end -= max(len(s) for s in self.stop) - 1
        piece = self.text[self.emitted:max(end, self.emitted)]
        self.emitted += len(piece)
        return piece


@torch.inference_mode()
def run(model: Decoder, tokenizer: Tokenizer | None, prompts: list[list[int]], max_new_tokens: int,
        sampling: Sampling, eos: set[int], stop: list[str], seed: int | None, cache=None, start: int = 0,
        heals: list[Heal | None] | None = None):
    """Yields the list of Sequences after every step; the last yield has all of them finished.
    `heals`: per prompt, a Heal whose `ids` are the prompt given, or None (see heal()).
    `cache` (one prompt only): a cache already holding the prompt's first `start` tokens, which
    are not computed again (a chat turn prefills only what it adds); it must fit the whole run."""
    cfg, device = model.cfg, model.device
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError("empty prompt: give at least one token")
    if max(lens) > cfg.max_position:
        raise UsageError(f"prompt of {max(lens)} tokens exceeds the model's context of {cfg.max_position}")
    heals = heals or [None] * len(prompts)
    seqs = [Sequence(p, StreamDecoder(tokenizer, h.context if h else ()) if tokenizer else None, stop,
                     heal=h.tail if h else "") for p, h in zip(prompts, heals)]
    budget = min(max_new_tokens, cfg.max_position - min(lens))
    if budget <= 0:
        for s in seqs:
            s.finish("length")
        yield seqs
        return
    gen = None
    if sampling.temperature:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.seed())
    B, T = len(prompts), max(lens)
    if cache is None:
        cache, start = model.new_cache(B, min(cfg.max_position, T + budget)), 0
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor(lens, device=device)
    logits = model(ids[:, start:], start, cache, last=lengths - 1 - start)   # (B, V)
    pos = lengths.clone()                                             # where each next token goes
    uniform = B == 1 or len(set(lens)) == 1       # one shared position: an int start
    for b, h in enumerate(heals):                                     # the first token extends the tail
        if h:
            logits[b] = only(logits[b], h.allowed)
    for step in range(budget):
        seen = _seen(seqs, device) if sampling.repetition_penalty else None
        tok = next_tokens(logits, sampling, seen, gen)
        for s, t in zip(seqs, tok.tolist()):
            if s.finish_reason is None:
                s.add(t, eos)
                if s.finish_reason is None and len(s.prompt) + len(s.tokens) >= cfg.max_position:
                    s.finish("length")
        if all(s.finish_reason for s in seqs) or step == budget - 1:   # no forward for unused logits
            break
        yield seqs
        start = int(pos[0]) if uniform else pos
        logits = model(tok[:, None], start, cache)[:, -1]
        pos += 1
    for s in seqs:
        s.finish("length")
    yield seqs


def _seen(seqs: list[Sequence], device) -> torch.Tensor:
    """(B, N) ids each sequence has seen so far (padded by repeating its last id, which is harmless
    for a penalty applied once per distinct id)."""
    rows = [s.prompt + s.tokens for s in seqs]
    n = max(len(r) for r in rows)
    return torch.tensor([r + [r[-1]] * (n - len(r)) for r in rows], device=device)

"""`minillm verify`: our logits against a reference on the same token ids, with a verdict.

For each prompt the reference (transformers in float32, or logits saved as safetensors) first
continues it greedily for N tokens; both models then score the whole sequence (prompt + that
continuation) in one forward pass, and we compare the logits position by position: max |diff|,
KL(ref || ours), top-1 agreement. Separately our own greedy decode (prefill + cached decoding, the
path `generate` takes) is checked against the reference's N tokens (reported; the verdict is on the
logits, where a near-tie cannot flip the answer).

The reference always runs in float32, whatever dtype ours runs in: a bf16 run is measured against
the exact math, not against another bf16 implementation's rounding (the stricter, more useful check;
a bf16 transformers run sits at the same distance from it as ours should).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import hf
from .api import LLM, load
from .errors import UsageError
from .locate import LoadError

NEAR_TIE = 1e-3   # a greedy divergence where the reference's top-2 logits are closer than this is a tie

# bf16/fp16 verdict: thresholds on the mean KL(ref fp32 || ours) and top-1 agreement, calibrated on
# the 7 tiny test checkpoints (tests/conftest.py: random weights at init range 0.3, far noisier in
# bf16 than trained models), default prompts, 16 new tokens:
#   correct bf16:  KL 5.9e-4 .. 3.5e-3, top-1 0.934 .. 0.974 (transformers' own bf16 run: the same)
#   correct fp16:  KL 1.0e-5 .. 4.7e-5, top-1 0.987 .. 0.998
#   wrong bf16:    softmax scale off by sqrt(2): KL 0.08 .. 0.38, top-1 0.54 .. 0.77; layer-0 k/v rows
#                  swapped: KL ~4, top-1 < 0.1; layer-0 qkv x1.1: KL 0.044 .. 0.083 on gpt2 / llama
#                  (4e-3 on qwen3, whose QK-norm undoes the scale of q and k)
#   wrong fp16:    any one matrix x1.05: KL >= 8.7e-4
# bf16 rounding alone moves KL as much as scaling one matrix by 1.01 .. 1.1 does, so no bf16 threshold
# sees a perturbation that small: bf16 verify catches implementation bugs (orders of magnitude off),
# fp32 catches everything. The thresholds sit ~3x (bf16) / ~10x (fp16) above the worst correct run.
HALF_THRESHOLDS = {
    torch.bfloat16: {"kl": 1e-2, "top1_agreement": 0.90},
    torch.float16: {"kl": 5e-4, "top1_agreement": 0.97},
}

# quantized (weight-only) verdict, calibrated the same way (7 tiny checkpoints, default prompts, 16
# new tokens; activations enter the kernels in bf16, so int8's figures include bf16's rounding):
#   correct int8:     KL 2.0e-3 .. 1.4e-2, top-1 0.894 .. 0.960
#   correct int4 g32: KL 0.25 .. 0.78, top-1 0.36 .. 0.57; g64: KL 0.33 .. 0.99, top-1 0.31 .. 0.53
#   wrong int8:       every scale x1.1: KL 0.094 .. 0.16, top-1 0.71 .. 0.81 on gpt2 / llama (0.027,
#                     top-1 0.88 .. 0.91 on qwen3, whose QK-norm undoes q's and k's scale)
#   wrong int4:       groups taken along N instead of K: KL 3.6 .. 4.8, top-1 < 0.03; every scale
#                     x1.1: KL 0.37 .. 1.04, inside int4's own spread on weights this noisy
# int8 sits ~3x above the worst correct run and catches a 10% scale error; int4's random-weight error
# is as large as a 10% scale error, so its threshold (2x above the worst correct run) catches layout
# bugs only. On a trained model both are far tighter (README "Quantization": SmolLM2-135M).
QUANT_THRESHOLDS = {
    8: {"kl": 4e-2, "top1_agreement": 0.85},
    4: {"kl": 2.0, "top1_agreement": 0.20},
}

DEFAULT_PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog, and then",
    "3.14159 26535 89793 + 2 * 21 = 42; 1, 1, 2, 3, 5, 8, 13,",
    "Naïve café — 日本語のテキスト, emoji 🙂 and Ünïcödé:",
    "import os, sys\nfor i in range(10):\n    print(i, 'hello world', sys.argv)\n",
    # long-ish: positions past where short prompts stop (rope, long attention rows)
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n\n"
    "The stack holds items last in, first out. A queue, by contrast, hands them back in the order "
    "they came, which is why breadth-first search uses one and depth-first search the other.",
]


class VerifyError(ValueError):
    """Verification could not run (no reference, a malformed reference file, ...)."""


@dataclass
class Reference:
    """One prompt's reference: the ids scored (prompt + greedy continuation) and their logits."""
    ids: list[int]            # (T,)
    prompt_len: int           # ids[prompt_len:] is the reference's greedy continuation
    logits: torch.Tensor      # (T, V) float32, cpu
    text: str | None = None


@dataclass
class VerifyReport:
    passed: bool
    max_abs_diff: float       # over every position of every prompt
    kl: float                 # mean KL(ref || ours) per position
    top1_agreement: float     # fraction of positions whose argmax agrees
    greedy_agreement: float | None   # fraction of prompts whose greedy tokens agree (None: not checked)
    max_abs_ref: float        # max |reference logit|, the fp32 threshold's scale
    thresholds: dict
    dtype: str                # ours; the reference is float32
    reference: str            # "transformers" or the file read
    model: str
    prompts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return _finite(asdict(self))


def _finite(x):
    """NaN / inf -> None: the report must stay valid JSON when a broken model produces NaNs."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def verify(model_or_path=None, prompts=None, new_tokens: int = 16, dtype=None, device=None,
           backend: str = "auto", reference: str | os.PathLike = "transformers", tol: float = 1e-4,
           save: str | os.PathLike | None = None, quantize: str | None = None) -> VerifyReport:
    """Check a model (a folder, hub id, None for the default model, or a loaded LLM, used as is)
    against `reference`: "transformers" or a safetensors file of `input_ids.K` / `logits.K` pairs.
    `save`: write the reference's logits in that format. Raises VerifyError when it cannot run."""
    if new_tokens < 0:
        raise UsageError(f"new_tokens must be >= 0, got {new_tokens}")
    if not tol > 0:
        raise UsageError(f"tol must be > 0, got {tol}")
    llm = (model_or_path if isinstance(model_or_path, LLM)
           else load(model_or_path, device, dtype, backend, quantize=quantize))
    if str(reference) == "transformers":
        refs = transformers_reference(llm, _prompt_ids(llm, prompts, new_tokens), new_tokens)
        source = "transformers" + (" (its GGUF reader, same file)" if llm.path.suffix == ".gguf" else "")
    else:
        if prompts:
            raise UsageError("a saved reference fixes the prompts (its input_ids); do not pass prompts too")
        refs, source = read_reference(reference), str(reference)
    if save is not None:
        save_reference(refs, save, model=str(llm.path))
    rows = [_compare(llm, r) for r in refs]
    return _report(llm, rows, source, tol)


def _prompt_ids(llm: LLM, prompts, new_tokens: int) -> list[tuple[list[int], str | None]]:
    """(ids, text) per prompt. Default prompts are cut from the left to leave room for the new
    tokens in a small context; the caller's own prompts must fit as given."""
    given = prompts is not None
    one = isinstance(prompts, str) or (given and len(prompts) > 0 and isinstance(prompts[0], int))
    prompts = [prompts] if one else list(prompts if given else DEFAULT_PROMPTS)   # str | ids: one prompt
    if not prompts:
        raise UsageError("no prompts given")
    if llm.tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise VerifyError(f"{llm.path} has no tokenizer.json: give prompts as lists of token ids")
    room = llm.config.max_position - new_tokens
    out = []
    for p in prompts:
        ids = llm.encode(p)
        if not ids:
            raise VerifyError(f"prompt {p!r} encodes to no tokens")
        if len(ids) > room:
            if given:
                raise UsageError(f"a prompt of {len(ids)} tokens + {new_tokens} new tokens exceeds the "
                                  f"model's context of {llm.config.max_position}")
            ids = ids[len(ids) - max(room, 1):]
        out.append((ids, p if isinstance(p, str) else None))
    return out


def transformers_reference(llm: LLM, prompts: list[tuple[list[int], str | None]],
                           new_tokens: int) -> list[Reference]:
    """The same checkpoint in transformers, float32, on our device: greedy continuation with its
    KV cache (stopping at our eos ids), then one full forward for the logits."""
    try:
        src, kwargs = _transformers_source(llm)
        ref = hf.load_reference(src, torch.float32, llm.device, what="--reference transformers",
                                progress=sys.stderr.isatty(), **kwargs)
    except LoadError as e:
        raise VerifyError(str(e)) from None
    device = llm.device
    eos, out, kw = set(llm.eos_token_ids), [], hf.cache_kwarg(ref)
    with torch.no_grad():   # not inference_mode: transformers' forward runs ~10x slower under it (5.23, CPU)
        for ids, text in prompts:
            n = min(new_tokens, llm.config.max_position - len(ids))
            step = ref(torch.tensor([ids], device=device), use_cache=True)
            seq = list(ids)
            for _ in range(n):
                t = int(step.logits[0, -1].argmax())
                seq.append(t)
                if t in eos or len(seq) == len(ids) + n:
                    break
                step = ref(torch.tensor([[t]], device=device), use_cache=True, **{kw: getattr(step, kw)})
            logits = ref(torch.tensor([seq], device=device)).logits[0].float().cpu()   # (T, V)
            out.append(Reference(seq, len(ids), logits, text))
    return out


def _transformers_source(llm: LLM) -> tuple[Path, dict]:
    """from_pretrained's arguments; a GGUF file through transformers' GGUF reader, where it reads that
    file right (the same dequantization), else a VerifyError saying why and what to use instead."""
    if llm.path.suffix != ".gguf":
        return llm.path, {}
    from .gguf import transformers_reads
    why = transformers_reads(llm)
    if why:
        raise VerifyError(f"{why}, so it is no reference for {llm.path.name}: give --reference FILE, "
                          "saved by `minillm verify -m ORIGINAL_CHECKPOINT --save FILE`")
    return llm.path.parent, {"gguf_file": llm.path.name}


def save_reference(refs: list[Reference], path, model: str = ""):
    """safetensors: `input_ids.K` (T,) int64 and `logits.K` (T, V) float32 per prompt K; the
    prompt length (where the greedy continuation starts) and text go in the metadata."""
    from safetensors.torch import save_file
    tensors, meta = {}, {"format": "pt", "minillm": "verify reference", "model": model}
    for k, r in enumerate(refs):
        tensors[f"input_ids.{k}"] = torch.tensor(r.ids, dtype=torch.long)
        tensors[f"logits.{k}"] = r.logits.float().contiguous()
        meta[f"prompt_len.{k}"] = str(r.prompt_len)
        if r.text is not None:
            meta[f"prompt.{k}"] = r.text
    save_file(tensors, str(path), metadata=meta)


def read_reference(path) -> list[Reference]:
    """The format save_reference writes. A file made elsewhere needs only the tensor pairs
    (ids (T,) or (1, T), logits (T, V) or (1, T, V)); without `prompt_len.K` metadata the whole
    sequence counts as prompt and greedy decoding is not checked."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise VerifyError(f"no such reference file: {path} (give 'transformers' or a .safetensors file)")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys, meta = set(f.keys()), f.metadata() or {}
            ks = sorted(int(k.split(".", 1)[1]) for k in keys
                        if k.startswith("input_ids.") and k.split(".", 1)[1].isdigit())
            if not ks:
                raise VerifyError(f"{path} holds no input_ids.K / logits.K tensor pairs")
            refs = []
            for k in ks:
                if f"logits.{k}" not in keys:
                    raise VerifyError(f"{path} has input_ids.{k} but no logits.{k}")
                ids, logits = f.get_tensor(f"input_ids.{k}"), f.get_tensor(f"logits.{k}").float()
                ids = ids.reshape(-1).tolist()
                logits = logits.reshape(-1, logits.shape[-1])
                if logits.shape[0] != len(ids):
                    raise VerifyError(f"{path}: logits.{k} has {logits.shape[0]} positions, "
                                      f"input_ids.{k} has {len(ids)}")
                refs.append(Reference(ids, int(meta.get(f"prompt_len.{k}", len(ids))), logits,
                                      meta.get(f"prompt.{k}")))
    except SafetensorError as e:
        raise VerifyError(f"{path} is not a readable safetensors file: {e}") from None
    return refs


def _compare(llm: LLM, r: Reference) -> dict:
    ref = r.logits.double()                                    # (T, V)
    if any(t >= llm.config.vocab_size or t < 0 for t in r.ids):
        raise VerifyError(f"reference ids outside this model's vocabulary of {llm.config.vocab_size}")
    ours = llm.logits([r.ids])[0].double().cpu()               # (T, V)
    if ours.shape != ref.shape:
        raise VerifyError(f"reference logits are {tuple(ref.shape)}, this model gives {tuple(ours.shape)}")
    lp_ref, lp_ours = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (lp_ref.exp() * (lp_ref - lp_ours)).sum(-1)          # (T,) KL(ref || ours) per position
    row = {"prompt": r.text, "tokens": len(r.ids), "prompt_tokens": r.prompt_len,
           "max_abs_diff": (ours - ref).abs().max().item(), "max_abs_ref": ref.abs().max().item(),
           "kl": kl.mean().item(), "kl_sum": kl.sum().item(),
           "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).double().mean().item(),
           "top1_matches": int((ours.argmax(-1) == ref.argmax(-1)).sum()),
           "greedy_match": None, "greedy_divergence": None, "greedy_near_tie": False, "ref_top2_gap": None}
    want = r.ids[r.prompt_len:]
    if want:
        got = llm.generate(r.ids[:r.prompt_len], max_new_tokens=len(want), temperature=0,
                           repetition_penalty=1.0).token_ids
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                 None if len(got) == len(want) else min(len(got), len(want)))
        row["greedy_match"], row["greedy_divergence"] = i is None, i
        if i is not None:
            top2 = ref[r.prompt_len - 1 + i].topk(2).values    # the reference's choice at the split
            row["ref_top2_gap"] = (top2[0] - top2[1]).item()
            row["greedy_near_tie"] = row["ref_top2_gap"] < NEAR_TIE
            row["greedy_match"] = row["greedy_near_tie"]       # a tie either way is agreement
    return row


def _report(llm: LLM, rows: list[dict], source: str, tol: float) -> VerifyReport:
    positions = sum(r["tokens"] for r in rows)
    max_diff = max(r["max_abs_diff"] for r in rows)
    if any(math.isnan(r["max_abs_diff"]) for r in rows):
        max_diff = math.nan
    max_ref = max(r["max_abs_ref"] for r in rows)
    kl = sum(r.pop("kl_sum") for r in rows) / positions
    top1 = sum(r.pop("top1_matches") for r in rows) / positions
    greedy = [r["greedy_match"] for r in rows if r["greedy_match"] is not None]
    greedy_agreement = sum(greedy) / len(greedy) if greedy else None
    dtype, q, scheme = llm.dtype, llm.model.run.quantize, llm.model.run.scheme   # a GGUF's blocks as stored: exact
    if scheme or dtype in HALF_THRESHOLDS:
        th = dict(QUANT_THRESHOLDS[scheme.bits] if scheme else HALF_THRESHOLDS[dtype])
        passed = kl <= th["kl"] and top1 >= th["top1_agreement"]
    else:
        th = {"max_abs_diff": tol * max(1.0, max_ref), "tol": tol}
        passed = max_diff <= th["max_abs_diff"]     # False for NaN
    for r in rows:
        r.pop("max_abs_ref")
    return VerifyReport(bool(passed), max_diff, kl, top1, greedy_agreement, max_ref, th,
                        str(dtype).removeprefix("torch.") + (f" {q}" if q else ""),
                        source, str(llm.path), rows)


def format_report(rep: VerifyReport) -> str:
    """The human-readable report: one line per prompt, then the verdict."""
    lines = [f"model {rep.model}  dtype {rep.dtype}  reference {rep.reference} (float32)",
             f"{'#':>2} {'tokens':>6} {'max|diff|':>10} {'KL':>10} {'top-1':>7}  greedy"]
    for k, r in enumerate(rep.prompts):
        if r["greedy_match"] is None:
            g = "not checked"
        elif r["greedy_divergence"] is None:
            g = "identical"
        elif r["greedy_near_tie"]:
            g = f"near-tie at token {r['greedy_divergence']} (gap {r['ref_top2_gap']:.1e}): agrees"
        else:
            g = f"DIVERGES at token {r['greedy_divergence']} (reference top-2 gap {r['ref_top2_gap']:.2g})"
        lines.append(f"{k:>2} {r['tokens']:>6} {r['max_abs_diff']:>10.3g} {r['kl']:>10.3g} "
                     f"{r['top1_agreement']:>7.1%}  {g}")
    greedy = "not checked" if rep.greedy_agreement is None else f"{rep.greedy_agreement:.0%}"
    lines.append(f"all   max|diff| {rep.max_abs_diff:.3g} (max|ref| {rep.max_abs_ref:.3g})  "
                 f"KL {rep.kl:.3g}  top-1 {rep.top1_agreement:.1%}  greedy {greedy}")
    th = rep.thresholds
    if "tol" in th:
        rule = f"max|diff| <= {th['tol']:g} x max(1, max|ref|) = {th['max_abs_diff']:.3g}"
    else:
        rule = f"KL <= {th['kl']:g} and top-1 >= {th['top1_agreement']:.0%} ({rep.dtype})"
    lines.append(f"{'PASS' if rep.passed else 'FAIL'}: {rule}")
    return "\n".join(lines)

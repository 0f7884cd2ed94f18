#!/usr/bin/env python
"""Train minillm's embedded default model, ``minillm-pycode-5m``, from a seed.

The training text is something every machine has offline: the source of the
Python standard library this script runs under (``sysconfig.get_paths()["stdlib"]``,
``*.py`` files with their docstrings and comments). Left out:

* ``site-packages`` (third-party code, differs per machine),
* test suites (directories named ``test``, ``tests``, ``idle_test``),
* ``encodings/`` (generated codec tables) and ``pydoc_data/`` (a 750 KB string
  of English documentation), ``_sysconfigdata*`` (machine-specific build
  settings) and ``config-*`` directories.

About 5% of the modules are held out for evaluation, chosen by a hash of the
module's path relative to the stdlib root (deterministic, machine independent).

Pipeline:

1. Byte-level BPE tokenizer (``tokenizers``), trained on the training files only,
   with ``<|endoftext|>`` as its one special token (eos, and the file separator).
2. A small Llama-style decoder (``transformers.LlamaForCausalLM``: RMSNorm, RoPE,
   grouped-query attention, SiLU-gated MLP, tied embeddings), trained in fp32 on
   CPU with AdamW and a warmup + cosine schedule on random windows of the
   training token stream.
3. Saved with ``save_pretrained`` in bfloat16 together with the tokenizer and a
   generation config, then reloaded from disk with ``AutoModelForCausalLM`` /
   ``AutoTokenizer`` so that every reported number is measured on the shipped
   files:

   * held-out bits per byte: total NLL (bits) over the held-out token stream,
     divided by the held-out text's UTF-8 byte count; next to a unigram and a
     bigram byte model (add-one smoothing, fitted on the training bytes) on the
     same files;
   * "python-likeness": for each of the prompts ``def ``, ``class ``, ``import ``,
     20 seeded samples; a sample counts if ``ast.parse`` accepts it once cut to
     its last complete line (a sample that stops on eos is complete as is).

Writes ``eval.json`` next to the model and a loss-curve PNG (matplotlib,
optional: skipped with a message if it is not installed).

Default settings reproduce the shipped model: 3000 steps of 4 x 512 tokens (6.1M tokens,
2.3 passes over the training text) on two CPU threads, 45 minutes on this project's 2-core
machine (about 2,300 tokens/s; ~40 minutes when nothing else runs). From seed 0; bit-for-bit
given the same Python stdlib, torch build and thread count (`--threads 1` is reproducible on
any machine, at about 1,800 tokens/s)::

    python examples/train_default.py

A tiny smoke run (seconds)::

    python examples/train_default.py --max-files 8 --vocab-size 384 --steps 5 \\
        --layers 1 --hidden 64 --heads 2 --kv-heads 1 --seq-len 32 --batch-size 2 \\
        --samples 2 --out /tmp/tiny --plot /tmp/tiny/loss.png
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "minillm" / "models" / "minillm-pycode-5m"
DEFAULT_PLOT = REPO / "docs" / "train_loss.png"
EOS = "<|endoftext|>"
PROMPTS = ("def ", "class ", "import ")
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}


# --------------------------------------------------------------------------- data


def _holdout_bucket(rel: str) -> int:
    """0..99, from a hash of the module path: stable across machines and runs."""
    return int(hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8], 16) % 100


def collect_stdlib(holdout_pct: float, max_files: int | None):
    """Return (train, heldout, info): lists of (relative path, text), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")
        )
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                text = path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            if text.strip():
                files.append((rel, text))
    files.sort()
    train = [f for f in files if _holdout_bucket(f[0]) >= holdout_pct]
    heldout = [f for f in files if _holdout_bucket(f[0]) < holdout_pct]
    if max_files:
        # A spread-out subset (by hash order) rather than the alphabetically first files.
        def by_hash(f):
            return hashlib.sha1(f[0].encode("utf-8")).hexdigest()

        n_held = max(1, round(max_files * holdout_pct / 100))
        train = sorted(sorted(train, key=by_hash)[:max_files])
        heldout = sorted(sorted(heldout, key=by_hash)[:n_held])
    info = {
        "stdlib": str(root),
        "python": platform.python_version(),
        "files_train": len(train),
        "files_heldout": len(heldout),
        "files_skipped_non_utf8": skipped,
        "bytes_train": sum(len(t.encode("utf-8")) for _, t in train),
        "bytes_heldout": sum(len(t.encode("utf-8")) for _, t in heldout),
        "heldout_modules": [r for r, _ in heldout],
    }
    return train, heldout, info


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def wrap_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def token_stream(tok, texts, eos_id: int) -> torch.Tensor:
    """[eos] file1 [eos] file2 [eos] ... as one int64 tensor."""
    ids = [eos_id]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------- model


def build_model(args, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or _default_intermediate(args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    return model


def _default_intermediate(hidden: int) -> int:
    # ~8/3 * hidden (the SwiGLU convention), rounded up to a multiple of 32.
    return int(math.ceil(hidden * 8 / 3 / 32) * 32)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # no decay on norms and on the (tied) embedding table
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def stream_nll(model, stream: torch.Tensor, seq_len: int, batch_size: int, max_tokens: int | None = None):
    """Sum of NLL (nats) of stream[1:] given the preceding tokens, in non-overlapping
    windows of seq_len predictions (each window restarts its context). Returns (nll, n)."""
    model.eval()
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    n_pred = stream.numel() - 1
    starts = list(range(0, n_pred, seq_len))
    total = 0.0
    full = [s for s in starts if s + seq_len + 1 <= stream.numel()]
    for i in range(0, len(full), batch_size):
        batch = torch.stack([stream[s : s + seq_len + 1] for s in full[i : i + batch_size]])
        logits = model(input_ids=batch[:, :-1]).logits.float()
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
    rest = [s for s in starts if s + seq_len + 1 > stream.numel()]
    for s in rest:
        piece = stream[s:].unsqueeze(0)
        logits = model(input_ids=piece[:, :-1]).logits.float()
        total += F.cross_entropy(logits[0], piece[0, 1:], reduction="sum").item()
    model.train()
    return total, n_pred


# ---------------------------------------------------------------------- baselines


def byte_baselines(train_texts, heldout_texts):
    """Bits per byte of add-one smoothed unigram and bigram byte models (fitted on the
    training bytes) on the held-out bytes. The bigram's context at a file start is a
    separate 'start of file' state."""
    start = 256
    uni = np.zeros(256, dtype=np.float64)
    bi = np.zeros((257, 256), dtype=np.float64)
    for t in train_texts:
        b = np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        uni += np.bincount(b, minlength=256)
        prev = np.concatenate([[start], b[:-1]])
        bi += np.bincount(prev * 256 + b, minlength=257 * 256).reshape(257, 256)
    log_uni = np.log2((uni + 1) / (uni.sum() + 256))
    log_bi = np.log2((bi + 1) / (bi.sum(axis=1, keepdims=True) + 256))
    bits_uni = bits_bi = 0.0
    n = 0
    for t in heldout_texts:
        b = np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        prev = np.concatenate([[start], b[:-1]])
        bits_uni -= log_uni[b].sum()
        bits_bi -= log_bi[prev, b].sum()
        n += b.size
    return bits_uni / n, bits_bi / n


# ---------------------------------------------------------------- python-likeness


def cut_to_complete_lines(text: str, finished: bool) -> str:
    """Drop the trailing partial line unless the sample ended on eos."""
    if finished:
        return text
    nl = text.rfind("\n")
    return text[: nl + 1] if nl >= 0 else ""


def parses(code: str) -> bool:
    if not code.strip():
        return False
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def heldout_likeness(hf_tok, heldout_texts, n: int, max_new_tokens: int) -> dict:
    """The same rule applied to real code: up to n snippets per prompt, each starting where a line
    of a held-out module starts with the prompt and running the prompt plus max_new_tokens tokens.
    What a model that wrote exactly like the stdlib would score: the ceiling of the measure."""
    out = {}
    for prompt in PROMPTS:
        starts = [(t, m.start()) for t in heldout_texts for m in re.finditer("^" + re.escape(prompt), t, re.M)]
        picks = starts[::max(1, len(starts) // n)][:n]   # spread over the modules, deterministic
        ok = 0
        keep = len(hf_tok(prompt, add_special_tokens=False)["input_ids"]) + max_new_tokens
        for text, at in picks:
            window = text[at:at + 8 * keep]                  # > keep tokens of code (~3.6 bytes each)
            ids = hf_tok(window, add_special_tokens=False)["input_ids"]
            at_end = at + len(window) == len(text) and len(ids) <= keep   # the module ends first
            ok += parses(cut_to_complete_lines(hf_tok.decode(ids[:keep]), finished=at_end))
        out[prompt] = round(ok / len(picks), 4) if picks else None
    return out


class _FirstTokenPrefix:
    """Logits processor for token healing: at the first generated position, allow only
    tokens whose byte-level string starts with `prefix` (the prompt's dropped last token)."""

    def __init__(self, hf_tok, prefix: str, prompt_len: int):
        vocab = hf_tok.get_vocab()
        allowed = [i for t, i in vocab.items() if t.startswith(prefix)]
        self.mask = torch.full((len(vocab),), float("-inf"))
        self.mask[allowed] = 0.0
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_len:
            scores = scores + self.mask[: scores.shape[-1]].to(scores.dtype)
        return scores


@torch.no_grad()
def sample_completions(model, hf_tok, prompt: str, n: int, seed: int, max_new_tokens: int, gen_kwargs,
                       token_healing: bool = True):
    """n seeded samples of prompt + completion; returns [(text, ended_on_eos)].

    Token healing: a prompt ending in a space ("def ") tokenizes to [..., "def", "Ġ"], and a
    lone "Ġ" before a name almost never occurs in training (byte-level BPE glues the space
    to the next word: "Ġfibonacci"), so the model would continue with more whitespace or a
    comment. With healing, the trailing whitespace token is dropped from the prompt and the
    first sampled token is constrained to start with it."""
    from transformers import LogitsProcessorList

    eos_id = hf_tok.convert_tokens_to_ids(EOS)
    prompt_ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
    processors = LogitsProcessorList()
    head = prompt
    if token_healing and len(prompt_ids) > 1:
        last = hf_tok.convert_ids_to_tokens(prompt_ids[-1])
        if hf_tok.decode([prompt_ids[-1]]).isspace():
            prompt_ids = prompt_ids[:-1]
            head = hf_tok.decode(prompt_ids)
            processors.append(_FirstTokenPrefix(hf_tok, last, len(prompt_ids)))
    ids = torch.tensor([prompt_ids] * n)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=eos_id,
        eos_token_id=eos_id,
        logits_processor=processors,
        **gen_kwargs,
    )
    results = []
    for row in out[:, ids.size(1) :].tolist():
        finished = eos_id in row
        if finished:
            row = row[: row.index(eos_id)]
        results.append((head + hf_tok.decode(row), finished))
    return results


# --------------------------------------------------------------------------- plot


def write_plot(path: Path, history, eval_points, tokens_per_step: int, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the loss plot "
              "(pip install matplotlib, or minillm[examples])")
        return None
    steps = np.array([h[0] for h in history])
    loss = np.array([h[1] for h in history])
    ema, smooth = None, []
    for x in loss:
        ema = x if ema is None else 0.98 * ema + 0.02 * x
        smooth.append(ema)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps * tokens_per_step / 1e6, loss, color="#9ecae1", lw=0.6, label="train (per step)")
    ax.plot(steps * tokens_per_step / 1e6, smooth, color="#08519c", lw=1.5, label="train (EMA)")
    if eval_points:
        ax.plot([p[0] * tokens_per_step / 1e6 for p in eval_points], [p[1] for p in eval_points],
                "o-", color="#e6550d", ms=3.5, lw=1.2, label="held-out")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    lo = min(min(smooth), min((p[1] for p in eval_points), default=9e9))
    ax.set_ylim(max(0.0, lo - 0.3), min(max(loss), lo + 4.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data / tokenizer")
    d.add_argument("--max-files", type=int, default=None, help="cap on training files (tiny runs)")
    d.add_argument("--holdout-pct", type=float, default=5.0, help="share of modules held out")
    d.add_argument("--vocab-size", type=int, default=4096)
    m = p.add_argument_group("model")
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--intermediate", type=int, default=None, help="MLP width (default ~8/3 hidden)")
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=4)
    m.add_argument("--max-positions", type=int, default=512, help="max_position_embeddings")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr-ratio", type=float, default=0.1)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2,
                   help="torch threads (default 2, one per core here; 1 is bit-reproducible on any "
                        "machine and steadier on a shared CPU, but ~1.3x slower)")
    t.add_argument("--time-budget-min", type=float, default=None,
                   help="if set, measure throughput over the first steps and shorten the "
                        "cosine schedule to fit; also a hard stop (not deterministic)")
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--eval-tokens", type=int, default=16384,
                   help="held-out tokens for the periodic eval points")
    e = p.add_argument_group("evaluation / output")
    e.add_argument("--samples", type=int, default=20, help="samples per prompt")
    e.add_argument("--sample-tokens", type=int, default=96, help="max new tokens per sample")
    e.add_argument("--temperature", type=float, default=0.7)
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--out", type=Path, default=DEFAULT_OUT)
    e.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="loss curve PNG path")
    e.add_argument("--no-plot", action="store_true")
    e.add_argument("--eval-json", type=Path, default=None, help="default: OUT/eval.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)
    t_start = time.time()

    # ---- data + tokenizer
    train, heldout, data_info = collect_stdlib(args.holdout_pct, args.max_files)
    if not train or not heldout:
        sys.exit("no training or held-out files found")
    print(f"data: {data_info['files_train']} train files ({data_info['bytes_train'] / 1e6:.2f} MB), "
          f"{data_info['files_heldout']} held-out ({data_info['bytes_heldout'] / 1e6:.2f} MB) "
          f"from {data_info['stdlib']}")
    train_texts = [t for _, t in train]
    heldout_texts = [t for _, t in heldout]
    tok = train_tokenizer(train_texts, args.vocab_size)
    eos_id = tok.token_to_id(EOS)
    train_ids = token_stream(tok, train_texts, eos_id)
    heldout_ids = token_stream(tok, heldout_texts, eos_id)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, train stream {train_ids.numel():,} tokens "
          f"({data_info['bytes_train'] / train_ids.numel():.2f} bytes/token), "
          f"held-out {heldout_ids.numel():,} tokens  [{time.time() - t_start:.0f}s]")
    if train_ids.numel() <= args.seq_len + 1:
        sys.exit("training stream shorter than one window; use more files or a smaller --seq-len")

    # ---- model
    model = build_model(args, tok.get_vocab_size(), eos_id)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    print(f"model: {n_params:,} parameters ({n_params - n_embed:,} non-embedding), "
          f"{args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"torch threads {torch.get_num_threads()}")
    opt = make_optimizer(model, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    max_start = train_ids.numel() - (args.seq_len + 1)
    tokens_per_step = args.batch_size * args.seq_len

    # ---- train
    total_steps = args.steps
    history, eval_points = [], []
    model.train()
    t_train = time.time()
    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    stopped_early = False
    bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    step = 0
    while step < total_steps:
        lr = lr_at(step, total_steps, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        history.append((step + 1, loss.item()))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
        if budget_s and step == 20:
            per_step = (time.time() - t_train) / step
            # leave ~15% of the budget for the final evaluation and sampling
            afford = int((0.85 * budget_s - (time.time() - t_start)) / per_step) + step
            if afford < total_steps:
                total_steps = max(step, afford)
                bar.total = total_steps
                bar.write(f"time budget: shortening the schedule to {total_steps} steps")
        if step % args.eval_every == 0 or step == total_steps:
            nll, n = stream_nll(model, heldout_ids, args.seq_len, args.batch_size, args.eval_tokens)
            eval_points.append((step, nll / n))
            el = time.time() - t_train
            bar.write(f"step {step}/{total_steps}  train {loss.item():.3f}  held-out {nll / n:.3f} "
                      f"nats/token  lr {lr:.2e}  {step * tokens_per_step / el:,.0f} tok/s  {el / 60:.1f} min")
        if budget_s and time.time() - t_start > budget_s and step < total_steps:
            stopped_early = True
            bar.write("time budget exhausted: stopping early")
            break
    bar.close()
    train_seconds = time.time() - t_train

    # fp32 held-out number before the bf16 rounding, for reference
    nll_fp32, n_pred = stream_nll(model, heldout_ids, args.seq_len, args.batch_size)

    # ---- save (bf16 weights) + tokenizer + generation config
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    hf_tok = wrap_tokenizer(tok, args.max_positions)
    hf_tok.save_pretrained(out)
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        (out / extra).unlink(missing_ok=True)
    # A portable tokenizer_config.json: "PreTrainedTokenizerFast" loads in transformers 4.x and 5.x.
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": args.max_positions,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen_cfg = GenerationConfig(
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=128,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    model.generation_config = gen_cfg
    model.to(torch.bfloat16).save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", 10000.0)  # older readers look for it at the top level
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600; package data should be world-readable
    del model

    # ---- reload what was shipped; measure on it
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(out)
    model.eval()
    nll, n_pred = stream_nll(model, heldout_ids, args.seq_len, args.batch_size)
    bpb = nll / math.log(2) / data_info["bytes_heldout"]
    bpb_fp32 = nll_fp32 / math.log(2) / data_info["bytes_heldout"]
    uni_bpb, bi_bpb = byte_baselines(train_texts, heldout_texts)

    gen_kwargs = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    likeness, examples = {}, {}
    for healing in (True, False):
        per_prompt = {}
        for i, prompt in enumerate(PROMPTS):
            samples = sample_completions(model, hf_tok, prompt, args.samples, args.seed + i,
                                         args.sample_tokens, gen_kwargs, token_healing=healing)
            ok = [parses(cut_to_complete_lines(t, fin)) for t, fin in samples]
            per_prompt[prompt] = (sum(ok), len(ok))
            if healing:
                examples[prompt] = [t for t, _ in samples[:3]]
        likeness[healing] = per_prompt
    n_ok = sum(k for k, _ in likeness[True].values())
    n_all = sum(n for _, n in likeness[True].values())
    n_ok_raw = sum(k for k, _ in likeness[False].values())
    per_prompt = {p: k / n for p, (k, n) in likeness[True].items()}

    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    result = {
        "model": out.name,
        "heldout_bits_per_byte": round(bpb, 4),
        "heldout_bits_per_byte_fp32_before_bf16": round(bpb_fp32, 4),
        "unigram_byte_bits_per_byte": round(uni_bpb, 4),
        "bigram_byte_bits_per_byte": round(bi_bpb, 4),
        "heldout_tokens": n_pred,
        "heldout_bytes": data_info["bytes_heldout"],
        "python_likeness": round(n_ok / n_all, 4),
        "python_likeness_per_prompt": {k: round(v, 4) for k, v in per_prompt.items()},
        "python_likeness_without_token_healing": round(n_ok_raw / n_all, 4),
        "python_likeness_without_token_healing_per_prompt": {
            p: round(k / n, 4) for p, (k, n) in likeness[False].items()},
        "python_likeness_heldout_code_per_prompt": heldout_likeness(hf_tok, heldout_texts, args.samples,
                                                                    args.sample_tokens),
        "python_likeness_method": (
            f"{args.samples} samples per prompt (seed {args.seed}+i), temperature {args.temperature}, "
            f"top_p {args.top_p}, up to {args.sample_tokens} new tokens, token healing of the prompt's "
            "trailing space (see sample_completions); share that ast.parse accepts after dropping "
            "the trailing partial line (kept whole if it ended on eos)"),
        "params": n_params,
        "params_non_embedding": n_params - n_embed,
        "tokens_seen": step * tokens_per_step,
        "steps": step,
        "steps_planned": args.steps,
        "stopped_early": stopped_early,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "train_tokens_per_second": round(step * tokens_per_step / train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "folder_bytes": size,
        "config": {k: getattr(args, k) for k in (
            "vocab_size", "layers", "hidden", "heads", "kv_heads", "max_positions", "seq_len",
            "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "seed",
            "holdout_pct", "max_files")},
        "command": " ".join(["python examples/train_default.py", *(sys.argv[1:] if argv is None else argv)]),
        "data": {k: v for k, v in data_info.items() if k != "heldout_modules"},
        "heldout_modules": data_info["heldout_modules"],
        "examples": examples,
    }
    result["data"]["tokens_train"] = int(train_ids.numel())
    if not args.no_plot:
        title = (f"{out.name}: {n_params / 1e6:.1f}M params, held-out {bpb:.2f} bpb "
                 f"(bigram {bi_bpb:.2f})")
        result["plot"] = write_plot(args.plot, history, eval_points, tokens_per_step, title)
    eval_path = args.eval_json or out / "eval.json"
    eval_path.parent.mkdir(parents=True, exist_ok=True)
    eval_path.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"held-out bits/byte: model {bpb:.3f} (fp32 before bf16 {bpb_fp32:.3f}) | "
          f"bigram bytes {bi_bpb:.3f} | unigram bytes {uni_bpb:.3f}")
    print(f"python-likeness: {n_ok}/{n_all} parse ({', '.join(f'{k!r}: {v:.0%}' for k, v in per_prompt.items())}); "
          f"without token healing {n_ok_raw}/{n_all}")
    print(f"params {n_params:,}, tokens seen {step * tokens_per_step:,}, train {train_seconds / 60:.1f} min, "
          f"total {(time.time() - t_start) / 60:.1f} min, folder {size / 1e6:.1f} MB")
    for prompt in PROMPTS:
        print(f"--- sample for {prompt!r}:\n{examples[prompt][0]}")
    print(f"wrote {out} and {eval_path}")
    return result


if __name__ == "__main__":
    main()

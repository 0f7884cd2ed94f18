"""The `minillm` command. Every command that takes a model takes it as -m/--model (default: the
embedded model). Bad input prints one line to stderr and exits non-zero, never a traceback."""
from __future__ import annotations

import functools
import sys

import click

from .api import load
from .loader import LoadError
from .tokenizer import TokenizerError

EXPECTED = (LoadError, TokenizerError, ValueError, FileNotFoundError, OSError)


def fail(msg: str, code: int = 1):
    click.echo(f"minillm: error: {msg}", err=True)
    sys.exit(code)


def friendly(fn):
    """Turn expected failures into one clear line and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED as e:
            fail(str(e) or type(e).__name__)
        except KeyboardInterrupt:
            fail("interrupted", 130)
    return wrapper


def model_options(fn):
    for opt in reversed([
        click.option("-m", "--model", default=None, help="Local folder or hub id (default: the embedded model)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                   "the checkpoint's on GPU)."),
        click.option("--backend", default="auto", type=click.Choice(["auto", "torch", "triton"])),
    ]):
        fn = opt(fn)
    return fn


@click.group()
@click.version_option(package_name="minillm")
def main():
    """minillm: a small, readable LLM inference runtime."""


@main.command()
@model_options
@click.argument("prompt")
@click.option("-n", "--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json).")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--min-p", type=float, default=None)
@click.option("--repetition-penalty", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@friendly
def generate(model, device, dtype, backend, prompt, max_new_tokens, temperature, top_k, top_p, min_p,
             repetition_penalty, seed, stop):
    """Stream the completion of PROMPT to stdout."""
    llm = load(model, device=device, dtype=dtype, backend=backend)
    out = click.get_text_stream("stdout")
    out.write(prompt)
    out.flush()
    for piece in llm.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                            stop=list(stop) or None):
        out.write(piece)
        out.flush()
    out.write("\n")


if __name__ == "__main__":
    main()

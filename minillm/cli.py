"""The `minillm` command. Every command that takes a model takes it as -m/--model (default: the
embedded model). Bad input prints one line to stderr and exits non-zero, never a traceback.
Each command imports what it needs when it runs: `minillm --help` loads no torch."""
from __future__ import annotations

import functools
import sys

import click

from .errors import LoadError, TokenizerError, UsageError

EXPECTED = (LoadError, TokenizerError, ValueError, FileNotFoundError, OSError)


def fail(msg: str, code: int = 1):
    click.echo(f"minillm: error: {msg}", err=True)
    sys.exit(code)


USAGE, FAILURE, VERIFY_FAIL = 2, 1, 3   # exit codes: README "Exit codes"


def friendly(fn):
    """Expected failures become one clear line and an exit code: 2 for a bad argument (UsageError,
    as click's own usage errors), 1 for anything else that went wrong; never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            fail(str(e), USAGE)
        except EXPECTED as e:
            fail(str(e) or type(e).__name__, FAILURE)
        except KeyboardInterrupt:
            fail("interrupted", 130)
    return wrapper


def model_options(fn):
    for opt in reversed([
        click.option("-m", "--model", default=None, help="Local folder, hub id or GGUF file (default: the embedded model)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                   "the checkpoint's on GPU)."),
        click.option("--backend", default="auto", type=click.Choice(["auto", "torch", "triton"])),
        click.option("--quantize", default=None, metavar="SCHEME",
                     help="Weight-only quantization at load: int8 (per output channel) | int4 (group 32) | "
                          "int4:g64 | int4:g128 | none. A GGUF file's Q4_0/Q4_1/Q8_0 tensors run as stored "
                          "unless this says otherwise (none: dequantized)."),
    ]):
        fn = opt(fn)
    return fn


def sampling_options(fn):
    for opt in reversed([
        click.option("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)."),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--min-p", type=float, default=None),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None),
    ]):
        fn = opt(fn)
    return fn


def chat_options(fn):
    fn = click.option("--chat-template", default=None, metavar="FILE",
                      help="A Jinja chat template file (or a .json holding chat_template): replaces the model's.")(fn)
    return click.option("--system", default=None, help="A system message opening the conversation.")(fn)


@click.group()
@click.version_option(package_name="minillm")
def main():
    """minillm: a small, readable LLM inference runtime."""


@main.command()
@model_options
@click.argument("prompt")
@click.option("-n", "--max-new-tokens", default=128, show_default=True, type=int)
@sampling_options
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--chat", is_flag=True, help="PROMPT is one user message, rendered with the chat template; "
                                           "print only the reply.")
@chat_options
@click.option("--token-healing/--no-token-healing", default=None,
              help="Back up the prompt's last token and make the first new token extend it (default: "
                   "when the prompt ends in a space or tab, i.e. mid-token).")
@friendly
def generate(model, device, dtype, backend, quantize, prompt, max_new_tokens, stop, chat, system, chat_template,
             token_healing, **sampling):
    """Stream the completion of PROMPT to stdout."""
    if (system or chat_template) and not chat:
        raise UsageError("--system and --chat-template need --chat")
    from .api import load
    llm = load(model, device=device, dtype=dtype, backend=backend, quantize=quantize)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        pieces = llm.stream_chat(messages, max_new_tokens, **sampling, stop=list(stop) or None,
                                 chat_template=chat_template)
    else:
        pieces = llm.stream(prompt, max_new_tokens=max_new_tokens, **sampling, stop=list(stop) or None,
                            token_healing=token_healing)
    first = next(pieces, "")       # a bad setting fails here, before anything is printed
    click.echo(("" if chat else prompt) + first, nl=False)   # echo flushes: pieces show as they are decoded
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


CHAT_HELP = "/reset starts over, /exit (or Ctrl-D) leaves, /help shows this; Ctrl-C stops a reply."


@main.command()
@model_options
@chat_options
@click.option("-n", "--max-new-tokens", default=512, show_default=True, type=int, help="Per reply.")
@sampling_options
@friendly
def chat(model, device, dtype, backend, quantize, system, chat_template, max_new_tokens, **sampling):
    """Talk with an instruct model through its chat template. From a terminal: interactive, replies
    stream. Piped: one user message per line, each reply followed by a blank line."""
    from .api import ChatSession, load
    llm = load(model, device=device, dtype=dtype, backend=backend, quantize=quantize)
    session = ChatSession(llm, system, chat_template)
    tty = sys.stdin.isatty()
    if tty:
        click.echo(f"minillm chat with {llm.path.name}. {CHAT_HELP}", err=True)
    while True:
        try:
            line = input(">>> ") if tty else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo("\n(/exit or Ctrl-D leaves)", err=True)
            continue
        if not tty and not line:          # end of the piped input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text in ("/reset", "/help") or text.startswith("/") and " " not in text:
            if text == "/reset":
                session.reset()
            click.echo("(conversation cleared)" if text == "/reset" else CHAT_HELP, err=True)
            continue
        pieces = session.send(line.rstrip("\n"), max_new_tokens, **sampling)
        try:
            for piece in pieces:
                click.echo(piece, nl=False)
        except KeyboardInterrupt:         # stop this reply, keep the conversation
            pieces.close()
            click.echo(" [stopped]", nl=False)
        except EXPECTED as e:
            if not tty:                   # scripted: an error ends the run (exit 1)
                raise
            click.echo(f"minillm: error: {e} (/reset starts over)", err=True)
            continue
        click.echo("\n")                  # the reply's end, then a blank line


@main.command()
@model_options
@click.option("--prompt", "prompt_texts", multiple=True,
              help="A prompt (repeatable; default: a built-in varied set).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="A file of prompts: a JSON list of strings if it ends in .json, else one per line.")
@click.option("--new-tokens", default=16, show_default=True, type=int, help="Greedy tokens compared per prompt.")
@click.option("--reference", default="transformers", show_default=True,
              help="'transformers' (same checkpoint, float32) or a .safetensors file of input_ids.K / logits.K.")
@click.option("--save", type=click.Path(dir_okay=False),
              help="Write the reference's logits to this .safetensors file.")
@click.option("--tol", default=1e-4, show_default=True, type=float,
              help="fp32: pass when max|diff| <= tol x max(1, max|reference logit|).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def verify(model, device, dtype, backend, quantize, prompt_texts, prompts_file, new_tokens, reference, save, tol, as_json):
    """Check minillm's logits against a reference. Exit 0: PASS, 3: FAIL; 1: it could not run,
    2: a bad argument."""
    import json
    from pathlib import Path

    from .verify import format_report
    from .verify import verify as run_verify
    prompts = list(prompt_texts) or None
    if prompts_file:
        text = Path(prompts_file).read_text()
        if prompts_file.endswith(".json"):
            extra = json.loads(text)
        else:
            extra = [p for p in text.splitlines() if p.strip()]
        if not isinstance(extra, list) or not extra:
            raise UsageError(f"{prompts_file}: expected a non-empty list of prompts")
        prompts = (prompts or []) + extra
    try:
        rep = run_verify(model, prompts=prompts, new_tokens=new_tokens, dtype=dtype, device=device,
                         backend=backend, reference=reference, tol=tol, save=save, quantize=quantize)
    except EXPECTED:
        raise
    except Exception:   # a crash must not read as a verdict: show it, exit 1
        import traceback
        traceback.print_exc()
        sys.exit(FAILURE)
    click.echo(json.dumps(rep.to_dict()) if as_json else format_report(rep))
    sys.exit(0 if rep.passed else VERIFY_FAIL)


@main.command()
@model_options
@click.option("--memory", default=None, help="e.g. 24GiB: the longest context (and batch x context) whose "
                                             "weights + KV cache fit (activations not counted).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def info(model, device, dtype, backend, quantize, memory, as_json):
    """Architecture, parameters, weight bytes and KV cache bytes per token, from config.json and
    safetensors headers (a hub id's weights are not downloaded)."""
    import json

    from .info import format_info
    from .info import info as run_info
    d = run_info(model, dtype=dtype, memory=memory, device=device, backend=backend, quantize=quantize)
    click.echo(json.dumps(d) if as_json else format_info(d))


SERVE_HINT = ('minillm serve needs fastapi and uvicorn: pip install fastapi uvicorn '
              '(in a minillm checkout: pip install -e ".[serve]")')


@main.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="MINILLM_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (or set MINILLM_API_KEY).")
@click.option("--served-model-name", default=None, help="The model's name in the API (default: -m as given, "
                                                         "else the embedded model's folder name).")
@click.option("--max-running", default=64, show_default=True, type=click.IntRange(1),
              help="Sequences in the running batch at once.")
@click.option("--max-pending", default=None, type=click.IntRange(1),
              help="Sequences running or waiting; beyond it requests get 503 (default: 4 x --max-running).")
@click.option("--kv-memory", default=None, help="Bytes for the KV pool, e.g. 2GiB (default: 1GiB, at most "
                                                "--max-running full contexts).")
@click.option("--kv-blocks", default=None, type=click.IntRange(1), help="Size the KV pool in blocks instead.")
@click.option("--block-size", default=16, show_default=True, type=click.IntRange(1), help="Tokens per KV block.")
@click.option("--chat-template", default=None, metavar="FILE", help="A Jinja chat template file: replaces the "
                                                                   "model's for /v1/chat/completions.")
@friendly
def serve(model, device, dtype, backend, quantize, host, port, api_key, served_model_name, max_running, max_pending,
          kv_memory, kv_blocks, block_size, chat_template):
    """An OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics."""
    if kv_memory is not None and kv_blocks is not None:
        raise UsageError("give --kv-memory or --kv-blocks, not both")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        fail(SERVE_HINT)
    from .api import load
    from .engine import EngineSettings
    from .info import parse_size
    from .server import Server, serve as run_server
    settings = dict(block_size=block_size, max_running=max_running, num_blocks=kv_blocks)
    if kv_memory is not None:
        settings["kv_memory"] = parse_size(kv_memory)
    settings = EngineSettings(**settings)
    # a server decodes for hours: the weights' copy in 2 MiB pages (2-10% faster decode) pays
    llm = load(model, device=device, dtype=dtype, backend=backend, quantize=quantize, mmap=False)
    if chat_template is not None:
        llm._template(chat_template).check(chat_template)    # a template that does not parse: fail now
    server = Server(llm, served_model_name or model or llm.path.name, settings, api_key, max_pending, chat_template)
    run_server(server, host, port)


def _ints(ctx, param, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: expected positive integers separated by commas")
    return out


@main.command()
@model_options
@click.option("--random", "shape", default=None,
              help="Bench a random-weight checkpoint of a named shape instead of -m (tiny, llama-125m, "
                   "deepseek-moe); built once with transformers, cached in ~/.cache/minillm.")
@click.option("--prompt-len", default="128,512", show_default=True, callback=_ints)
@click.option("--new-tokens", default=64, show_default=True, type=int)
@click.option("--batch", default="1,8", show_default=True, callback=_ints,
              help="Batch 1 runs at every prompt length, larger batches at the shortest.")
@click.option("--compare", type=click.Choice(["transformers", "llama.cpp"]), multiple=True,
              help="Also run transformers (same checkpoint) or llama.cpp (llama-cpp-python, on GGUF files) on "
                   "the same prompts, interleaved; repeatable.")
@click.option("--llama-gguf", "llama_gguf", multiple=True, type=click.Path(dir_okay=False),
              help="A GGUF file for llama.cpp (repeatable: F32, F16, Q8_0, Q4_0 ... variants side by side; "
                   "default: MODEL when it is a GGUF). Implies --compare llama.cpp.")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=None, type=click.IntRange(1), help="Torch threads for both systems "
                                                                      "(default: torch's, one per core).")
@click.option("--cold-start/--no-cold-start", default=True, show_default=True,
              help="Also time `minillm generate` (and a minimal transformers script) from process start.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def bench(model, device, dtype, backend, quantize, shape, prompt_len, new_tokens, batch, compare, llama_gguf, repeat,
          threads, cold_start, as_json):
    """Load time, prefill, time to first token, decode and batched decode speed, memory and the
    memory-bandwidth roof; with --compare, side by side with transformers or llama.cpp. --dtype and
    --quantize take comma lists: `--dtype float32,bfloat16 --quantize none,int8,int4` runs minillm
    unquantized in each dtype and quantized in the first one (fp32, bf16, int8, int4)."""
    import json

    from .bench import bench as run_bench
    from .bench import random_checkpoint, report
    from .locate import resolve
    if shape and model:
        raise UsageError("give -m MODEL or --random SHAPE, not both")
    from .gguf import find
    log = (lambda msg: None) if as_json else (lambda msg: click.echo(f"# {msg}", err=True))
    path = random_checkpoint(shape, log) if shape else (find(model) or resolve(model))
    out = run_bench(path, device=device, dtype=dtype, backend=backend, prompt_lens=prompt_len,
                    new_tokens=new_tokens, batches=batch, compare=list(compare), repeat=repeat, threads=threads,
                    cold_start=cold_start, log=log, quantize=quantize, llama_gguf=llama_gguf)
    click.echo(json.dumps(out) if as_json else report(out))


if __name__ == "__main__":
    main()

"""The one-call CPU decode step (minillm/decode_step.py, kernels/cpu_step.c) against the eager
Decoder it replaces: every architecture it takes, fp32 and bf16, quantized weights, batches of
unequal lengths, the engine's paged cache; and the ones it must leave to the eager path."""
import pytest
import torch
from conftest import ARCHS

import minillm
from minillm import decode_step
from minillm.kernels import cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason=f"CPU loops unavailable: {cpu_gemv.why_not()}")
FUSED = [a for a in ARCHS if a != "gpt2"]


def decode(model, ids, fused: bool, monkeypatch, steps=6):
    """Prefill ids (B, T), then `steps` tokens one at a time from unequal starts (sequence b is
    b tokens shorter): the logits of every decode step, (steps, B, V) fp32."""
    monkeypatch.setenv("MINILLM_DECODE_STEP", "1" if fused else "0")
    model.__dict__.pop("_fused", None)
    B, T = ids.shape
    cache = model.new_cache(B, T + steps + 2)
    start = torch.tensor([T - b for b in range(B)])
    out = []
    with torch.inference_mode():
        model(ids, 0, cache)
        tok = ids[:, -1:]
        for s in range(steps):
            logits = model(tok, start + s, cache)[:, -1]                  # (B, V)
            out.append(logits.float())
            tok = logits.argmax(-1, keepdim=True)
    assert (model.fused_decode() is not None) == fused
    return torch.stack(out)


def ids_for(B=3, T=9, vocab=200):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", FUSED)
def test_fused_decode_equals_eager(name, checkpoints, monkeypatch):
    model = minillm.load(checkpoints[name], device="cpu").model
    assert decode_step.why_not(model) is None
    eager, fused = (decode(model, ids_for(), f, monkeypatch) for f in (False, True))
    assert (fused - eager).abs().max() <= 1e-5 * eager.abs().max()


def test_fused_decode_bf16_rounds_as_eager(checkpoints, monkeypatch):
    model = minillm.load(checkpoints["llama-bf16"], device="cpu", dtype="bfloat16").model
    eager, fused = (decode(model, ids_for(), f, monkeypatch) for f in (False, True))
    # the same kernels and rounding points; the norm's and exp's fp32 last bits may differ, so
    # a bf16 rounding can flip now and then: a few bf16 ulps, not a different computation
    assert (fused - eager).abs().max() <= 0.02 * eager.abs().max()
    assert (fused.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("quantize", ["int8", "int4", "int4:g64"])
def test_fused_decode_quantized_equals_eager(quantize, checkpoints, monkeypatch):
    model = minillm.load(checkpoints["qwen3"], device="cpu", quantize=quantize).model
    assert decode_step.why_not(model) is None
    eager, fused = (decode(model, ids_for(), f, monkeypatch) for f in (False, True))
    assert (fused - eager).abs().max() <= 1e-5 * eager.abs().max()


def test_engine_batch_through_fused_step(checkpoints, monkeypatch):
    """The paged pool (PagedStep.decode_rows) and a batch of several requests."""
    llm = minillm.load(checkpoints["llama-gqa-tied-llama3"], device="cpu")
    prompts = ["def fibonacci(n):", "The quick brown fox jumps over", "import os"]
    runs = {}
    for fused in (False, True):
        monkeypatch.setenv("MINILLM_DECODE_STEP", "1" if fused else "0")
        llm.model.__dict__.pop("_fused", None)
        runs[fused] = [r.token_ids for r in llm.generate(prompts, max_new_tokens=10, temperature=0)]
        assert (llm.model.fused_decode() is not None) == fused
    assert runs[True] == runs[False]


def test_what_it_leaves_to_the_eager_path(checkpoints, monkeypatch):
    assert "RMSNorm" in decode_step.why_not(minillm.load(checkpoints["gpt2"], device="cpu").model)
    model = minillm.load(checkpoints["llama-mha"], device="cpu").model
    assert model.fused_decode() is not None
    model.set_cpu_plan("blas-t")            # fp32 weights stored transposed: no C loop reads them
    assert "no C loop" in decode_step.why_not(model) and model.fused_decode() is None
    model.set_cpu_plan("blas")              # re-laid again: built anew over the new tensors
    ids = ids_for(B=1)
    assert model.fused_decode() is not None
    eager, fused = (decode(model, ids, f, monkeypatch) for f in (False, True))
    assert (fused - eager).abs().max() <= 1e-5 * eager.abs().max()
    monkeypatch.setenv("MINILLM_DECODE_STEP", "0")
    assert decode_step.why_not(model) == "MINILLM_DECODE_STEP=0"


def test_more_rows_than_the_loops_run_eagerly(checkpoints, monkeypatch):
    """Past MAX_ROWS sequences the eager path decodes (BLAS reads each weight once for all rows);
    both give the same numbers."""
    model = minillm.load(checkpoints["qwen3"], device="cpu").model
    ids = ids_for(B=decode_step.MAX_ROWS + 2)
    calls = []
    real = decode_step.DecodeStep.__call__
    monkeypatch.setattr(decode_step.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    eager = decode(model, ids, False, monkeypatch, steps=2)
    fused = decode(model, ids, True, monkeypatch, steps=2)
    assert not calls and (fused - eager).abs().max() <= 1e-5 * eager.abs().max()

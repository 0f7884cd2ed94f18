"""The kernels inside an MLA model: a tiny DeepSeek-V3 with backend "triton" (FlashAttention-2 on
the materialised K/V for prefill, minillm.kernels.mla_decode on the latent cache for decode)
against the torch backend.

Runs on CPU through the Triton interpreter (tests/run.sh sets TRITON_INTERPRET=1 for
tests/test_kernels*.py), or on a CUDA device; skips where neither can run the kernels."""
from dataclasses import replace

import pytest
import torch
from test_deepseek import build, cached_logits, close, ids_for

import minillm
from minillm import kernels
from minillm.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available()[0], reason=triton_available()[1])


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek") / "v3"
    build("v3", folder)
    return minillm.load(folder, device="cuda" if torch.cuda.is_available() else "cpu",
                        dtype=torch.float32, backend="torch")


def test_triton_decode_equals_torch(llm, monkeypatch):
    model = llm.model
    ids = ids_for(5, T=12).to(llm.device)
    ref = cached_logits(model, ids, [6] + [1] * 6)
    calls = []
    for fn in ("prefill_attention", "mla_decode"):
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, fn=fn, real=real: calls.append(fn) or real(*a))
    try:
        model.run = replace(model.run, backend="triton")
        got = cached_logits(model, ids, [6] + [1] * 6)
    finally:
        model.run = replace(model.run, backend="torch")
    assert close(got.float(), ref.float())
    L = model.cfg.num_layers   # the prefill and every decode step, in every layer, on the kernels
    assert calls == ["prefill_attention"] * L + ["mla_decode"] * 6 * L


def test_triton_batch_of_unequal_prompts(llm):
    prompts = ["def fibonacci(n):", "import os", "The quick brown fox jumps"]
    ref = llm.generate(prompts, max_new_tokens=6, temperature=0)
    try:
        llm.model.run = replace(llm.model.run, backend="triton")   # each sequence decodes at its own position: kv_len differs
        got = llm.generate(prompts, max_new_tokens=6, temperature=0)
    finally:
        llm.model.run = replace(llm.model.run, backend="torch")
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]

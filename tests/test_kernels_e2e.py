"""End to end: every architecture with backend="triton" (Triton's interpreter on CPU, run by
tests/run.sh with TRITON_INTERPRET=1) gives the fp32 logits and greedy tokens of backend="torch"."""
import os

import pytest
import torch
from conftest import ARCHS, VOCAB

import minillm

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1 (tests/run.sh runs this file with it)")


@pytest.mark.parametrize("name", ARCHS)
def test_triton_backend_equals_torch(name, checkpoints):
    torch_llm = minillm.load(checkpoints[name], device="cpu", backend="torch")
    triton_llm = minillm.load(checkpoints[name], device="cpu", backend="triton")
    assert triton_llm.model.run.backend == "triton"
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))
    ref, got = torch_llm.logits(ids), triton_llm.logits(ids)
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    prompts = ["def fibonacci(n):", "import os"]   # unequal lengths: per-sequence positions
    want = torch_llm.generate(prompts, max_new_tokens=8, temperature=0)
    have = triton_llm.generate(prompts, max_new_tokens=8, temperature=0)
    assert [r.token_ids for r in have] == [r.token_ids for r in want]


def test_triton_backend_without_interpreter_is_a_clear_error(checkpoints):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import minillm; minillm.load({str(checkpoints['gpt2'])!r}, device='cpu', backend='triton')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: a CPU triton backend is not an error path to check here")
    assert r.returncode != 0 and "backend 'triton' is not available here" in r.stderr

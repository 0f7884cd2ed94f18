"""The paged decode kernel vs its torch reference (TRITON_INTERPRET=1 on CPU, as tests/run.sh runs it),
and the engine on backend="triton" (which uses it) vs the engine on torch.

The pool's slots outside the sequences' blocks are NaN: a kernel that reads a key it should not
(wrong block, wrong row, past kv_len) gives NaN."""
import os

import pytest
import torch

from minillm.kernels import paged_decode_attention, paged_decode_attention_ref

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1 (tests/run.sh runs this file with it)")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("H,HKV,D,Dv,bs", [(4, 2, 16, 16, 4), (8, 1, 32, 16, 16), (2, 2, 8, 8, 8)])
def test_paged_decode_matches_reference(H, HKV, D, Dv, bs):
    g = torch.Generator().manual_seed(H * 100 + bs)
    lens = torch.tensor([1, 37, 9, bs * 3])
    B, nb, num_blocks = len(lens), -(-int(lens.max()) // bs), 40
    table = torch.randperm(num_blocks, generator=g)[:B * nb].view(B, nb)      # scattered blocks
    k = torch.full((num_blocks * bs, HKV, D), float("nan"))
    v = torch.full((num_blocks * bs, HKV, Dv), float("nan"))
    for b in range(B):
        for j in range(int(lens[b])):
            row = table[b, j // bs] * bs + j % bs
            k[row], v[row] = torch.randn(HKV, D, generator=g), torch.randn(HKV, Dv, generator=g)
    q = torch.randn(B, H, D, generator=g)
    clean_k, clean_v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    want = paged_decode_attention_ref(q, clean_k, clean_v, table, lens, bs, 0.3)
    for splits in (None, 1, 3):
        got = paged_decode_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), table.to(DEVICE),
                                     lens.to(DEVICE), bs, 0.3, num_splits=splits)
        torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa-tied-llama3", "gpt2"])
def test_engine_on_triton_equals_torch(name, checkpoints):
    import minillm
    from minillm.engine import SamplingParams
    ps = [[5, 9, 11, 40, 41, 7, 8], [3] * 19, [100, 101]]
    out = {}
    for backend in ("torch", "triton"):
        llm = minillm.load(checkpoints[name], device="cpu", backend=backend)
        eng = llm.new_engine(block_size=4, max_step_tokens=12)
        out[backend] = [r.seq.tokens for r in eng.generate(ps, SamplingParams(max_tokens=6, eos=set()))]
    assert out["triton"] == out["torch"]

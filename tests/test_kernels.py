"""Triton kernels vs their torch references.

Run on CPU through the Triton interpreter, in a process of its own (the variable must be set
before triton is first imported):

    TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py

Without CUDA and without TRITON_INTERPRET=1 the kernel tests skip (they cannot run); the
references and the package import are still tested. On a CUDA machine the same grid runs on
the GPU, plus TestGPU with realistic shapes.

Every cache is a layer view `cache[1]` of a (L, B, S, Hkv, D) tensor whose other layer and
whose entries past each sequence's valid length are NaN: a kernel that reads outside the
valid keys, or uses wrong strides, produces NaN. The references get the same data with the
junk zeroed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from minillm.kernels import (
    decode_attention,
    decode_attention_ref,
    mla_decode,
    mla_decode_ref,
    prefill_attention,
    prefill_attention_ref,
    triton_available,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"

needs_backend = pytest.mark.skipif(
    not (INTERPRET or HAS_CUDA),
    reason="no CUDA device: run with TRITON_INTERPRET=1 (set before triton is imported) to test the kernels on CPU",
)

TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    assert torch.isfinite(out).all(), "kernel output has NaN/inf: it read junk outside the valid keys"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[out.dtype])


def layer_cache(B: int, S: int, heads: tuple[int, ...], D: int, valid: list[int], dtype, gen, layers: int = 2):
    """(kernel_view, clean_copy): layer 1 of a (layers, B, S, *heads, D) tensor with NaN past
    valid[b] (and in the other layers); the clean copy has zeros there instead."""
    full = torch.full((layers, B, S, *heads, D), float("nan"), dtype=dtype)
    full[1] = torch.randn((B, S, *heads, D), generator=gen).to(dtype)
    clean = full[1].clone()
    for b, n in enumerate(valid):
        full[1, b, n:] = float("nan")
        clean[b, n:] = 0
    return full.to(DEVICE)[1], clean.to(DEVICE)


def make_q(shape: tuple[int, ...], dtype, gen, layout: str) -> torch.Tensor:
    """A query tensor of `shape` (..., H, D) laid out as the model may hand it over:
    "contig"; "fused": a view into a fused qkv projection output (row stride > H*D);
    "dmajor": head dim not innermost (stride_d != 1)."""
    *lead, H, D = shape

    def rand(*size):  # the dtype and device are set before taking views: .to() would copy
        return torch.randn(size, generator=gen).to(dtype).to(DEVICE)

    if layout == "contig":
        q = rand(*shape)
    elif layout == "fused":
        qkv = rand(*lead, (H + 3) * D)  # q | k | v with 3 extra heads
        q = qkv[..., : H * D].view(*lead, H, D)
    elif layout == "dmajor":
        q = rand(*lead, D, H).transpose(-1, -2)
    else:
        raise ValueError(layout)
    return q


def test_triton_available_reports_a_reason():
    ok, reason = triton_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert ok == (INTERPRET or HAS_CUDA)


def test_package_imports_without_triton():
    """minillm.kernels (and its torch references) must import on machines without triton."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, minillm.kernels as K\n"
        "ok, why = K.triton_available()\n"
        "assert not ok and 'triton' in why, why\n"
        "q = torch.randn(1, 2, 2, 8); k = torch.randn(1, 4, 1, 8)\n"
        "assert K.prefill_attention_ref(q, k, k, torch.tensor([2]), 0.3).shape == (1, 2, 2, 8)\n"
        "try:\n"
        "    K.decode_attention(q[:, 0], k, k, torch.tensor([3]), 0.3)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('launcher ran without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- prefill

# (B, T, H, Hkv, Dqk, Dv, start, scale, q layout, tiles override (block_m, block_n) or None)
PREFILL_CASES = {
    "one-token": (1, 1, 2, 2, 64, 64, [0], None, "contig", None),
    "one-token-offset": (2, 1, 4, 1, 64, 64, [37, 3], None, "fused", None),
    "odd-T-gqa4-d80": (1, 33, 4, 1, 80, 80, [0], None, "contig", None),
    "gqa1-d128-long-offset": (2, 40, 3, 3, 128, 128, [30, 0], None, "fused", None),
    "gqa8-d128-offset": (1, 17, 8, 1, 128, 128, [5], None, "fused", None),
    "mla-192-128": (2, 20, 2, 2, 192, 128, [0, 13], None, "contig", None),
    "chunked-batch-d96": (3, 16, 4, 2, 96, 96, [0, 7, 40], None, "dmajor", None),
    "aligned-start-peaky": (1, 47, 2, 1, 64, 64, [16], 1.0, "contig", None),  # scores ~N(0, 64): stresses rescaling
    "tiles-m32-n16": (2, 37, 2, 1, 64, 64, [0, 19], None, "contig", (32, 16)),
    "tiles-m16-n32": (2, 37, 2, 1, 64, 64, [0, 19], None, "contig", (16, 32)),
}


def _prefill_inputs(case, dtype, seed=0):
    B, T, H, HKV, DQK, DV, start, scale, layout, tiles = case
    gen = torch.Generator().manual_seed(seed)
    S = max(start) + T + 5  # a few junk slots past the longest sequence
    valid = [s + T for s in start]
    q = make_q((B, T, H, DQK), dtype, gen, layout)
    k, k_clean = layer_cache(B, S, (HKV,), DQK, valid, dtype, gen)
    v, v_clean = layer_cache(B, S, (HKV,), DV, valid, dtype, gen)
    start_t = torch.tensor(start, device=DEVICE)
    scale = scale if scale is not None else 1.0 / math.sqrt(DQK)
    return q, k, v, k_clean, v_clean, start_t, scale, tiles


@needs_backend
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_fp32(name):
    q, k, v, kc, vc, start, scale, tiles = _prefill_inputs(PREFILL_CASES[name], torch.float32)
    kw = dict(block_m=tiles[0], block_n=tiles[1]) if tiles else {}
    assert_close(prefill_attention(q, k, v, start, scale, **kw), prefill_attention_ref(q, kc, vc, start, scale))


@needs_backend
@pytest.mark.parametrize(
    "name,dtype",
    [("odd-T-gqa4-d80", torch.bfloat16), ("chunked-batch-d96", torch.bfloat16), ("mla-192-128", torch.float16)],
)
def test_prefill_half(name, dtype):
    q, k, v, kc, vc, start, scale, _ = _prefill_inputs(PREFILL_CASES[name], dtype)
    assert_close(prefill_attention(q, k, v, start, scale), prefill_attention_ref(q, kc, vc, start, scale))


@needs_backend
def test_chunked_prefill_equals_full_prefill():
    """Prefilling 12 tokens then 9 more on top gives the same outputs as one 21-token prefill."""
    gen = torch.Generator().manual_seed(1)
    B, H, HKV, D, S = 1, 4, 2, 64, 24
    q = make_q((B, 21, H, D), torch.float32, gen, "contig")
    k, _ = layer_cache(B, S, (HKV,), D, [21], torch.float32, gen)
    v, _ = layer_cache(B, S, (HKV,), D, [21], torch.float32, gen)
    full = prefill_attention(q, k, v, torch.tensor([0], device=DEVICE), 0.125)
    first = prefill_attention(q[:, :12], k, v, torch.tensor([0], device=DEVICE), 0.125)
    second = prefill_attention(q[:, 12:], k, v, torch.tensor([12], device=DEVICE), 0.125)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-6, rtol=1e-5)


@needs_backend
@pytest.mark.parametrize("seed", range(6))
def test_prefill_random_sweep(seed):
    """Random small configurations (shapes, offsets, tile sizes) beyond the hand-picked cases."""
    rng = torch.Generator().manual_seed(100 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    hkv, group = pick([1, 2]), pick([1, 3, 4])
    dqk = pick([32, 48, 64, 80])
    B, T = pick([1, 2, 3]), int(torch.randint(1, 40, (1,), generator=rng))
    start = torch.randint(0, 30, (B,), generator=rng).tolist()
    tiles = (pick([16, 32]), pick([16, 32]))
    case = (B, T, hkv * group, hkv, dqk, pick([dqk, 32]), start, None, pick(["contig", "fused", "dmajor"]), tiles)
    q, k, v, kc, vc, start_t, scale, tiles = _prefill_inputs(case, torch.float32, seed=seed)
    out = prefill_attention(q, k, v, start_t, scale, block_m=tiles[0], block_n=tiles[1])
    assert_close(out, prefill_attention_ref(q, kc, vc, start_t, scale))


# ----------------------------------------------------------------------------- decode

# (H, Hkv, Dqk, Dv, kv_len per sequence, num_splits, q layout)
DECODE_CASES = {
    "one-key": (4, 4, 64, 64, [1], 1, "contig"),
    "gqa4-d80-unequal": (8, 2, 80, 80, [17, 70, 1], 4, "fused"),
    "gqa8-d128": (8, 1, 128, 128, [33, 64], 3, "contig"),
    "gqa1-d96": (3, 3, 96, 96, [48, 49, 15], 2, "fused"),
    "mla-192-128": (2, 1, 192, 128, [50], 2, "dmajor"),
    "auto-splits": (4, 2, 64, 64, [5, 70], None, "contig"),
    "more-splits-than-tiles": (2, 2, 64, 64, [20, 3], 8, "contig"),
}


def _decode_inputs(case, dtype, seed=0):
    H, HKV, DQK, DV, kv_len, num_splits, layout = case
    gen = torch.Generator().manual_seed(seed)
    B, S = len(kv_len), max(kv_len) + 3
    q = make_q((B, H, DQK), dtype, gen, layout)
    k, k_clean = layer_cache(B, S, (HKV,), DQK, kv_len, dtype, gen)
    v, v_clean = layer_cache(B, S, (HKV,), DV, kv_len, dtype, gen)
    return q, k, v, k_clean, v_clean, torch.tensor(kv_len, device=DEVICE), 1.0 / math.sqrt(DQK), num_splits


@needs_backend
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_fp32(name):
    q, k, v, kc, vc, kv_len, scale, ns = _decode_inputs(DECODE_CASES[name], torch.float32)
    assert_close(decode_attention(q, k, v, kv_len, scale, ns), decode_attention_ref(q, kc, vc, kv_len, scale))


@needs_backend
@pytest.mark.parametrize("name,dtype", [("gqa4-d80-unequal", torch.bfloat16), ("gqa8-d128", torch.float16)])
def test_decode_half(name, dtype):
    q, k, v, kc, vc, kv_len, scale, ns = _decode_inputs(DECODE_CASES[name], dtype)
    assert_close(decode_attention(q, k, v, kv_len, scale, ns), decode_attention_ref(q, kc, vc, kv_len, scale))


@needs_backend
@pytest.mark.parametrize("seed", range(6))
def test_decode_random_sweep(seed):
    rng = torch.Generator().manual_seed(200 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    hkv, group, d = pick([1, 2]), pick([1, 4, 8]), pick([32, 48, 64, 80])
    kv_len = torch.randint(1, 70, (pick([1, 2, 4]),), generator=rng).tolist()
    case = (hkv * group, hkv, d, pick([d, 32]), kv_len, pick([None, 1, 2, 5]), pick(["contig", "fused", "dmajor"]))
    q, k, v, kc, vc, kv_len_t, scale, ns = _decode_inputs(case, torch.float32, seed=seed)
    out = decode_attention(q, k, v, kv_len_t, scale, ns, block_n=pick([16, 32]))
    assert_close(out, decode_attention_ref(q, kc, vc, kv_len_t, scale))


@needs_backend
def test_decode_split_count_does_not_change_result():
    q, k, v, _, _, kv_len, scale, _ = _decode_inputs(DECODE_CASES["gqa4-d80-unequal"], torch.float32, seed=3)
    one = decode_attention(q, k, v, kv_len, scale, 1)
    for ns in (2, 5):
        torch.testing.assert_close(decode_attention(q, k, v, kv_len, scale, ns), one, atol=1e-6, rtol=1e-5)


@needs_backend
def test_decode_equals_one_token_prefill():
    """Decoding with kv_len n is a one-token prefill at start n - 1."""
    q, k, v, _, _, kv_len, scale, _ = _decode_inputs(DECODE_CASES["gqa4-d80-unequal"], torch.float32, seed=4)
    dec = decode_attention(q, k, v, kv_len, scale, 3)
    pre = prefill_attention(q[:, None], k, v, kv_len - 1, scale)[:, 0]
    torch.testing.assert_close(dec, pre, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- MLA decode

# (H, R, Dr, kv_len per sequence, num_splits, scale)
MLA_CASES = {
    "h20-r48-splits3": (20, 48, 16, [1, 70, 33], 3, 0.3),  # H not a multiple of the 16-head block
    "h16-r32-one-split": (16, 32, 16, [64], 1, 0.2),
    "h5-r64-auto": (5, 64, 32, [17, 9], None, 0.15),
}


def _mla_inputs(case, dtype, seed=0):
    H, R, DR, kv_len, num_splits, scale = case
    gen = torch.Generator().manual_seed(seed)
    B, S = len(kv_len), max(kv_len) + 3
    q_latent = make_q((B, H, R), dtype, gen, "fused")
    q_pe = make_q((B, H, DR), dtype, gen, "contig")
    c_kv, c_clean = layer_cache(B, S, (), R, kv_len, dtype, gen)
    k_pe, k_clean = layer_cache(B, S, (), DR, kv_len, dtype, gen)
    return q_latent, q_pe, c_kv, k_pe, c_clean, k_clean, torch.tensor(kv_len, device=DEVICE), scale, num_splits


@needs_backend
@pytest.mark.parametrize("name", list(MLA_CASES))
def test_mla_decode_fp32(name):
    ql, qp, c, kp, cc, kc, kv_len, scale, ns = _mla_inputs(MLA_CASES[name], torch.float32)
    assert_close(mla_decode(ql, qp, c, kp, kv_len, scale, ns), mla_decode_ref(ql, qp, cc, kc, kv_len, scale))


@needs_backend
def test_mla_decode_bf16():
    ql, qp, c, kp, cc, kc, kv_len, scale, ns = _mla_inputs(MLA_CASES["h20-r48-splits3"], torch.bfloat16)
    assert_close(mla_decode(ql, qp, c, kp, kv_len, scale, ns), mla_decode_ref(ql, qp, cc, kc, kv_len, scale))


def test_mla_ref_matches_explicit_formula():
    """The SDPA-based reference is the formula of the spec (caller's scale, c_kv as value)."""
    gen = torch.Generator().manual_seed(5)
    B, H, R, DR, S = 2, 3, 12, 4, 9
    ql, qp = torch.randn(B, H, R, generator=gen), torch.randn(B, H, DR, generator=gen)
    c, kp = torch.randn(B, S, R, generator=gen), torch.randn(B, S, DR, generator=gen)
    kv_len, scale = torch.tensor([9, 4]), 0.37
    score = (torch.einsum("bhr,bsr->bhs", ql, c) + torch.einsum("bhd,bsd->bhs", qp, kp)) * scale
    score = score.masked_fill(torch.arange(S)[None, None] >= kv_len[:, None, None], float("-inf"))
    expect = torch.einsum("bhs,bsr->bhr", score.softmax(-1), c)
    torch.testing.assert_close(mla_decode_ref(ql, qp, c, kp, kv_len, scale), expect, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- GPU, realistic shapes


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (larger shapes, compiled kernels)")
class TestGPU:
    dev = "cuda"

    def _cache(self, B, S, heads, D, valid, dtype):
        full = torch.randn((2, B, S, *heads, D), device=self.dev, dtype=dtype)
        clean = full[1].clone()
        for b, n in enumerate(valid):
            full[1, b, n:] = float("nan")
            clean[b, n:] = 0
        return full[1], clean

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("H,HKV,DQK,DV", [(32, 8, 128, 128), (16, 16, 192, 128), (28, 4, 80, 80)])
    def test_prefill(self, dtype, H, HKV, DQK, DV):
        torch.manual_seed(0)
        B, T, start = 3, 300, [0, 777, 2048]
        S = max(start) + T + 64
        q = torch.randn(B, T, H + 2 * HKV, DQK, device=self.dev, dtype=dtype)[:, :, :H]  # fused-qkv-like view
        k, kc = self._cache(B, S, (HKV,), DQK, [s + T for s in start], dtype)
        v, vc = self._cache(B, S, (HKV,), DV, [s + T for s in start], dtype)
        st = torch.tensor(start, device=self.dev)
        scale = DQK**-0.5
        assert_close(prefill_attention(q, k, v, st, scale), prefill_attention_ref(q, kc, vc, st, scale))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("H,HKV,D", [(32, 8, 128), (32, 32, 128), (64, 8, 64)])
    def test_decode(self, dtype, H, HKV, D):
        torch.manual_seed(0)
        kv_len = [1, 1000, 4096, 2500, 17]
        B, S = len(kv_len), 4096 + 64
        q = torch.randn(B, H, D, device=self.dev, dtype=dtype)
        k, kc = self._cache(B, S, (HKV,), D, kv_len, dtype)
        v, vc = self._cache(B, S, (HKV,), D, kv_len, dtype)
        kl = torch.tensor(kv_len, device=self.dev)
        ref = decode_attention_ref(q, kc, vc, kl, D**-0.5)
        for ns in (None, 1, 7, 32):
            assert_close(decode_attention(q, k, v, kl, D**-0.5, ns), ref)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("H", [128, 20])
    def test_mla_decode(self, dtype, H):
        torch.manual_seed(0)
        kv_len, R, DR = [3000, 17, 1], 512, 64
        B, S = len(kv_len), 3072
        ql = torch.randn(B, H, R, device=self.dev, dtype=dtype)
        qp = torch.randn(B, H, DR, device=self.dev, dtype=dtype)
        c, cc = self._cache(B, S, (), R, kv_len, dtype)
        kp, kc = self._cache(B, S, (), DR, kv_len, dtype)
        kl = torch.tensor(kv_len, device=self.dev)
        scale = 192**-0.5
        ref = mla_decode_ref(ql, qp, cc, kc, kl, scale)
        for ns in (None, 1, 9):
            assert_close(mla_decode(ql, qp, c, kp, kl, scale, ns), ref)

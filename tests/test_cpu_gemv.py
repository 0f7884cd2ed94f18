"""kernels/cpu_gemv.c against its torch references (kernels/cpu_gemv.py), and its int4 block order
against llama.cpp's own (the gguf package dequantizes Q4_0/Q4_1/Q8_0 blocks as llama.cpp does)."""
import numpy as np
import pytest
import torch

from minillm.kernels import cpu_gemv as g

pytestmark = pytest.mark.skipif(not g.available(), reason=f"the CPU loops cannot be built here: {g.why_not()}")


def rel_err(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


def int4_weight(N, K, G, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    d = (torch.rand(N, K // G, generator=gen) * 0.02 + 0.001).half()
    m = (torch.randn(N, K // G, generator=gen) * 0.05).half()
    return g.pack_int4(q), d, m


def test_pack_order_is_llama_cpps_q4():
    """A Q4_1 block as ggml writes it (d, m fp16, then 16 bytes: byte j = value j | value j+16 << 4),
    dequantized by the gguf package, equals our dequantization of the same bytes."""
    from gguf import GGMLQuantizationType, quants
    gen = torch.Generator().manual_seed(1)
    N, K = 3, 64
    packed, d, m = int4_weight(N, K, 32)
    raw = b"".join(d[n, b].numpy().tobytes() + m[n, b].numpy().tobytes() + packed[n, 16 * b:16 * b + 16].numpy().tobytes()
                   for n in range(N) for b in range(K // 32))
    ref = quants.dequantize(np.frombuffer(raw, np.uint8).reshape(N, -1), GGMLQuantizationType.Q4_1)
    assert torch.equal(g.dequant_int4_ref(packed, d, m), torch.from_numpy(ref.copy()).float())
    v = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    assert torch.equal(g.unpack_int4(g.pack_int4(v)), v)


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("K", [96, 128])
def test_float_weights(M, K):
    w = torch.randn(200, K) * 0.1
    x = torch.randn(M, K)
    assert rel_err(g.gemv(x, w), g.gemv_ref(x, w)) < 1e-5
    wb = w.bfloat16()
    assert rel_err(g.gemv(x, wb), g.gemv_ref(x, wb)) < 1e-5    # fp32 x: widened weights
    xb = x.bfloat16()                     # x holding bf16 values: AVX512-BF16 dot products where the CPU has them
    assert rel_err(g.gemv(xb.float(), wb), g.gemv_ref(xb, wb)) < 1e-5
    # bf16 in and out: the fp32 product's rounding, exactly
    got = g.gemv(xb, wb)
    assert got.dtype == torch.bfloat16 and torch.equal(got, g.gemv(xb.float(), wb).bfloat16())


@pytest.mark.parametrize("M", [1, 4, 8])
@pytest.mark.parametrize("G,K", [(32, 256), (64, 256), (128, 256), (0, 256), (0, 96), (0, 576), (32, 544),
                                 (32, 1056), (128, 640)])
def test_int8(M, G, K):
    """G = 0: one scale per row, over any number of blocks (3 and 18 too, not a power of two)."""
    N = 74
    gen = torch.Generator().manual_seed(M * 1000 + G)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    d = (torch.rand(N, K // (G or K), generator=gen) * 0.01 + 1e-3).half()
    x = torch.randn(M, K, generator=gen)
    got = g.gemv_int8(x, q, d)
    assert rel_err(got, g.gemv_int8_ref(x, q, d)) < 1e-5
    assert rel_err(g.gemv_int8(x, q, d, round_x=False), g.gemv_ref(x, g.dequant_int8_ref(q, d))) < 1e-5
    # x's int8 rounding: within a percent of the float product, not more
    assert 1e-4 < rel_err(got, g.gemv_ref(x, g.dequant_int8_ref(q, d))) < 3e-2
    for dtype in (torch.float32, torch.bfloat16):
        out = g.dequant_int8(q, d, torch.empty(N, K, dtype=dtype))
        assert torch.equal(out, g.dequant_int8_ref(q, d, dtype))


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("G,K", [(32, 384), (64, 384), (128, 384), (32, 96), (32, 544), (32, 1056), (64, 576),
                                 (128, 640)])
def test_int4(M, G, K):
    """Block counts odd and even, over and under 16 (the AVX-512 loop takes 16 blocks' scales at once);
    N not a multiple of 4 (one row of x takes 4 weight rows at a time, then the rest one by one)."""
    N = 42
    q, d, m = int4_weight(N, K, G)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    got = g.gemv_int4(x, q, d, m)
    assert rel_err(got, g.gemv_int4_ref(x, q, d, m)) < 1e-5
    assert rel_err(g.gemv_int4(x, q, d, m, round_x=False), g.gemv_ref(x, g.dequant_int4_ref(q, d, m))) < 1e-5
    assert rel_err(got, g.gemv_ref(x, g.dequant_int4_ref(q, d, m))) < 3e-2   # x rounded to int8
    for dtype in (torch.float32, torch.bfloat16):
        out = g.dequant_int4(q, d, m, torch.empty(N, K, dtype=dtype))
        assert torch.equal(out, g.dequant_int4_ref(q, d, m, dtype))


def test_threads_split_rows_not_results():
    """Each row is summed by one thread, in one order (one row of x takes 4 weight rows at a time:
    the threads split at multiples of 4), whatever the thread count."""
    q, d, m = int4_weight(333, 128, 32)
    w = torch.randn(333, 128)
    products = [lambda x: g.gemv_int4(x, q, d, m), lambda x: g.gemv(x, w),
                lambda x: g.gemv(x.bfloat16().float(), w.bfloat16())]
    n = torch.get_num_threads()
    try:
        for M in (1, 2):
            x = torch.randn(M, 128)
            torch.set_num_threads(1)
            one = [f(x) for f in products]
            for threads in (2, 3):
                torch.set_num_threads(threads)
                assert all(torch.equal(f(x), o) for f, o in zip(products, one))
    finally:
        torch.set_num_threads(n)


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86 builds only")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_other_builds(march, tmp_path):
    """The AVX2 path (vpmaddubsw instead of VNNI, two AVX2 registers per 16 floats) and the plain C
    one, built for this machine's baseline and run on it: the same tests."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "MINILLM_CPU_MARCH": march, "MINILLM_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "not other_builds"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "passed" in r.stdout and "skipped" not in r.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,Dv", [(32, 16), (64, 64), (128, 128)])   # the C side unrolls 64 and 128
def test_decode_attention_reads_cache_rows(dtype, D, Dv):
    """GQA (6 heads on 2), sequences of different lengths (keys in blocks of 16 and a tail, a tail
    alone), rows scattered as a paged pool's are."""
    from minillm.kernels import cpu_decode as c
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(128, 2, D, generator=gen).to(dtype)
    v = torch.randn(128, 2, Dv, generator=gen).to(dtype)
    q = torch.randn(3, 6, D, generator=gen)
    rows = torch.randperm(128, generator=gen)[:3 * 37].view(3, 37).contiguous()
    lens = torch.tensor([37, 1, 13])
    got = c.attend_decode(q, k, v, rows, lens, 0.17)
    assert rel_err(got, c.attend_decode_ref(q, k, v, rows, lens, 0.17)) < 1e-5


def test_rmsnorm():
    from minillm.kernels import cpu_decode as c
    x, w = torch.randn(3, 576), torch.randn(576)
    assert rel_err(c.rmsnorm(x, w, 1e-5), c.rmsnorm_ref(x, w, 1e-5)) < 1e-6


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_store(norm, dtype):
    """Qwen3's per-head norms, the rotary (halves layout), k and v into scattered cache rows."""
    from minillm.kernels import cpu_decode as c
    gen = torch.Generator().manual_seed(4)
    H, Hkv, D, B = 4, 2, 16, 3
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=gen)
    ang = torch.rand(B, D // 2, generator=gen) * 6
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    qn, kn = (torch.rand(D, generator=gen) + 0.5, torch.rand(D, generator=gen) + 0.5) if norm else (None, None)
    rows = torch.tensor([7, 2, 5])
    out = [qkv.clone(), torch.zeros(9, Hkv, D, dtype=dtype), torch.zeros(9, Hkv, D, dtype=dtype)]
    ref = [qkv.clone(), torch.zeros(9, Hkv, D, dtype=dtype), torch.zeros(9, Hkv, D, dtype=dtype)]
    c.qkv_store(out[0], H, Hkv, cos, sin, out[1], out[2], rows, qn, kn, 1e-6)
    c.qkv_store_ref(ref[0], H, Hkv, cos, sin, ref[1], ref[2], rows, qn, kn, 1e-6)
    assert rel_err(out[0], ref[0]) < 1e-6
    for a, b in zip(out[1:], ref[1:]):
        assert (a.float() - b.float()).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-2 * b.float().abs().max())
        assert a[[0, 1, 3]].abs().max() == 0                # only the three rows written


def test_silu_mul():
    from minillm.kernels import cpu_decode as c
    gu = torch.randn(3, 2 * 40)
    assert rel_err(c.silu_mul(gu), c.silu_mul_ref(gu)) < 1e-6

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
def test_float_weights(M):
    w = torch.randn(200, 96) * 0.1
    x = torch.randn(M, 96)
    assert rel_err(g.gemv(x, w), g.gemv_ref(x, w)) < 1e-5
    wb = w.bfloat16()
    assert rel_err(g.gemv(x, wb), g.gemv_ref(x, wb)) < 1e-5


@pytest.mark.parametrize("M", [1, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 128, 0])
def test_int8(M, G):
    N, K = 72, 256
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    d = (torch.rand(N, K // (G or K)) * 0.01 + 1e-3).half()
    x = torch.randn(M, K)
    ref = g.gemv_ref(x, g.dequant_int8_ref(q, d))
    assert rel_err(g.gemv_int8(x, q, d), ref) < 1e-5
    for dtype in (torch.float32, torch.bfloat16):
        out = g.dequant_int8(q, d, torch.empty(N, K, dtype=dtype))
        assert torch.equal(out, g.dequant_int8_ref(q, d, dtype))


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4(M, G):
    N, K = 40, 384
    q, d, m = int4_weight(N, K, G)
    x = torch.randn(M, K)
    ref = g.gemv_ref(x, g.dequant_int4_ref(q, d, m))
    assert rel_err(g.gemv_int4(x, q, d, m), ref) < 1e-5
    for dtype in (torch.float32, torch.bfloat16):
        out = g.dequant_int4(q, d, m, torch.empty(N, K, dtype=dtype))
        assert torch.equal(out, g.dequant_int4_ref(q, d, m, dtype))


def test_threads_split_rows_not_results():
    q, d, m = int4_weight(333, 128, 32)
    x = torch.randn(2, 128)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = g.gemv_int4(x, q, d, m)
        torch.set_num_threads(max(2, n))
        assert torch.equal(g.gemv_int4(x, q, d, m), one)   # each row is summed by one thread, in one order
    finally:
        torch.set_num_threads(n)

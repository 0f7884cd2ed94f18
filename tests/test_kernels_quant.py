"""kernels/weight_only.py (the GPU's int8/int4 weight-only decode product) against its torch
reference, under TRITON_INTERPRET=1 on CPU (tests/run.sh runs test_kernels*.py so)."""
import pytest
import torch

from minillm.kernels import quant_gemv, quant_gemv_ref, triton_available
from minillm.kernels.cpu_gemv import pack_int4

ok, why = triton_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)


def weights(bits, N, K, G, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = (torch.rand(N, K // G, generator=gen) * 0.02 + 0.001).half()
    if bits == 8:
        return torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen), d, None
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    return pack_int4(q), d, (torch.randn(N, K // G, generator=gen) * 0.05).half()


@pytest.mark.parametrize("bits,G,K", [(8, 32, 96), (8, 96, 96), (4, 32, 96), (4, 64, 128)])
@pytest.mark.parametrize("M", [1, 3])
def test_quant_gemv_equals_reference(bits, G, K, M):
    N = 40                                           # not a multiple of the tile: masked edges
    q, d, m = weights(bits, N, K, G)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    got, ref = quant_gemv(x, q, d, m), quant_gemv_ref(x, q, d, m)
    assert got.shape == (M, N) and got.dtype == x.dtype
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_quant_gemv_reads_the_q4_block_order():
    """One nibble set in each half of a block: the products see exactly that column."""
    N, K = 2, 64
    v = torch.zeros(N, K, dtype=torch.uint8)
    v[0, 5], v[1, 16 + 3] = 1, 1                    # low nibble of byte 5; high nibble of byte 3
    d, m = torch.ones(N, 2).half(), torch.zeros(N, 2).half()
    x = torch.arange(K, dtype=torch.float32)[None]
    assert quant_gemv(x, pack_int4(v), d, m).tolist() == [[5.0, 19.0]]


def test_quant_gemv_bf16_activations():
    q, d, m = weights(4, 24, 64, 32)
    x = torch.randn(2, 64).bfloat16()
    got = quant_gemv(x, q, d, m)
    assert got.dtype == torch.bfloat16
    assert (got.float() - quant_gemv_ref(x.float(), q, d, m)).abs().max() <= 1e-2 * got.float().abs().max()

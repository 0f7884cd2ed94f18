"""Weight-only quantization (minillm/quant.py): the arithmetic against plain torch, the kernels against
the dequantized weights, whole models against fp32 by verify's quantized thresholds (both ways: a
correct run passes, a wrong scale or a transposed group fails), fused rows, MoE and MLA, errors, and
the memory a quantized load takes."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

import minillm
from minillm import quant
from minillm.verify import QUANT_THRESHOLDS, verify


def test_parse():
    assert quant.parse("int4") == quant.Scheme(4, 32) and quant.parse("INT4:g128") == quant.Scheme(4, 128)
    assert quant.parse("int8") == quant.Scheme(8) and quant.parse(None) is None
    for bad in ("int5", "int4:g48", "int8:g32", "fp4"):
        with pytest.raises(minillm.errors.UsageError, match="unknown quantization"):
            quant.parse(bad)


def test_int8_round_trip():
    w = torch.randn(48, 80) * torch.rand(48, 1)             # rows of different ranges
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert torch.allclose(s, w.abs().amax(1) / 127)          # symmetric, one scale per output row
    err = (quant.dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()              # round to nearest: half a step at most
    assert ((q.abs() == 127).sum(1) >= 1).all()              # each row's largest value uses the full range


@pytest.mark.parametrize("group", [32, 64])
def test_int4_round_trip(group):
    w = torch.randn(32, 128) + torch.linspace(-2, 2, 128)    # groups with offsets: asymmetry matters
    q, s, z = quant.quantize_int4(w, group)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == (32, 128 // group)
    g = w.view(32, -1, group)                                # plain torch: (q - 8) s + z, min at q = 0
    assert torch.allclose(s, (g.amax(-1) - g.amin(-1)) / 15, atol=1e-6)
    assert torch.allclose(z, g.amin(-1) + 8 * s, atol=1e-5)
    err = (quant.dequantize_int4(q, s, z, group) - w).abs().view(32, -1, group)
    assert (err <= s[..., None] / 2 + 1e-5).all()
    back = quant.unnibble(quant.nibbles(q.to(torch.int32)))
    assert torch.equal(back.to(torch.uint8), q)


def filled(N, K, scheme, parts=1, lead=()):
    """A Packed module filled from a random weight (in `parts` row blocks, as a fused qkv is) ->
    (module, the weight it was given)."""
    m = quant.Packed(lead, N, K, scheme)
    for p in m.parameters():
        p.data = torch.empty_like(p, device="cpu")
    w = torch.randn(*lead, N, K) * 0.05
    cuts = [N * i // parts for i in range(parts + 1)]
    for e in range(lead[0] if lead else 1):
        for r0, r1 in zip(cuts, cuts[1:]):
            m.fill(e if lead else None, (r0, r1), (w[e] if lead else w)[r0:r1])
    m.finish()
    return m, w


@pytest.mark.parametrize("spec,N,K,kernel", [("int8", 40, 80, True), ("int8", 40, 72, False), ("int4", 96, 128, True),
                                             ("int4:g64", 48, 192, True), ("int4:g128", 48, 100, False)])
def test_kernel_equals_dequantized_weight(spec, N, K, kernel):
    scheme = quant.parse(spec)
    m, w = filled(N, K, scheme, parts=3)
    assert m.kernel == kernel   # K = 72 (int8), K = 100 (int4 g128): dequantized weights
    if scheme.bits == 8:
        dq = quant.dequantize_int8(*quant.quantize_int8(w, quant.KERNEL_DTYPE))
    else:
        dq = quant.dequantize_int4(*quant.quantize_int4(w, scheme.group, quant.KERNEL_DTYPE), scheme.group)
    for M in (1, 5, 33):
        x = torch.randn(M, K)
        ref = F.linear(x.to(quant.KERNEL_DTYPE).float() if m.kernel else x, dq)
        got = m.mm(x)
        assert got.dtype == x.dtype
        # the kernels round their output to bf16 (8 bits): a few units in the last place of |ref|
        assert (got - ref).abs().max() <= 2e-2 * ref.abs().max() + 1e-4
    assert torch.allclose(m.dense().float(), dq, atol=2e-2 * dq.abs().max())


def test_fused_rows_and_experts_fill_like_one_tensor():
    """Rows filled in parts (qkv from q, k, v) pack as if filled at once, for each stacked expert."""
    torch.manual_seed(0)
    a, w = filled(80, 64, quant.parse("int4"), parts=1, lead=(3,))
    b = quant.Packed((3,), 80, 64, quant.parse("int4"))
    for p in b.parameters():
        p.data = torch.empty_like(p, device="cpu")
    for e in range(3):
        for r0, r1 in ((0, 16), (16, 61), (61, 80)):         # not multiples of the kernel's 64-row blocks
            b.fill(e, (r0, r1), w[e, r0:r1])
    b.finish()
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales_zeros, b.scales_zeros)
    x = torch.randn(4, 64)
    ref = F.linear(x, w[2])                                  # int4: a few percent off, not more
    assert (a.mm(x, 2) - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.fixture(scope="module")
def saved_reference(checkpoints, tmp_path_factory):
    """llama-mha's fp32 transformers reference, saved once (verify --save)."""
    path = tmp_path_factory.mktemp("quant") / "ref.safetensors"
    verify(str(checkpoints["llama-mha"]), save=path)
    return path


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_quantized_model_passes_verify(checkpoints, saved_reference, spec):
    rep = verify(str(checkpoints["llama-mha"]), quantize=spec, reference=saved_reference)
    assert rep.passed and rep.dtype.endswith(quant.parse(spec).name)
    assert rep.thresholds == QUANT_THRESHOLDS[quant.parse(spec).bits]
    assert rep.kl > 0          # it did quantize


def test_wrong_scale_or_transposed_group_fails_verify(checkpoints, saved_reference, monkeypatch):
    orig8, orig4 = quant.quantize_int8, quant.quantize_int4

    def scale_off(w, dtype=torch.float32):
        q, s = orig8(w, dtype)
        return q, (s.float() * 1.1).to(dtype)
    monkeypatch.setattr(quant, "quantize_int8", scale_off)
    assert not verify(str(checkpoints["llama-mha"]), quantize="int8", reference=saved_reference).passed

    def transposed(w, group, dtype=torch.float32):    # groups of `group` rows instead of columns
        q, s, z = orig4(w.t().contiguous(), group, dtype)
        N, K = w.shape
        return q.t().contiguous(), s.reshape(N, K // group), z.reshape(N, K // group)
    monkeypatch.setattr(quant, "quantize_int8", orig8)
    monkeypatch.setattr(quant, "quantize_int4", transposed)
    assert not verify(str(checkpoints["llama-mha"]), quantize="int4", reference=saved_reference).passed


def kl_top1(ref, got):
    lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item(), (ref.argmax(-1) == got.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-tied-llama3", "qwen3"])
def test_architectures_close_to_fp32(checkpoints, name):
    """Tied heads (the embedding reads the int8 head), GPT-2's biases and transposed Conv1D."""
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = minillm.load(checkpoints[name], device="cpu").logits(ids)
    for spec in ("int8", "int4"):
        llm = minillm.load(checkpoints[name], device="cpu", quantize=spec)
        kl, top1 = kl_top1(ref, llm.logits(ids))
        th = QUANT_THRESHOLDS[quant.parse(spec).bits]
        assert 0 < kl <= th["kl"] and top1 >= th["top1_agreement"], (spec, kl, top1)
        # cached decoding (prefill + one-token steps) computes what the full forward does
        out = llm.generate(ids[0].tolist(), max_new_tokens=6, temperature=0)
        full = llm.logits([ids[0].tolist() + out.token_ids[:-1]])[0, -6:].argmax(-1).tolist()
        assert full == out.token_ids


def test_moe_and_mla(tmp_path):
    """DeepSeek-V3: routed experts (stacked), shared experts, MLA's low-rank projections (some too
    narrow for the int4 kernel: dequantized), absorbed decode through the dequantized kv_b."""
    from test_deepseek import build
    build("v3", tmp_path)
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    ref = minillm.load(tmp_path, device="cpu").logits(ids)
    for spec in ("int8", "int4"):
        llm = minillm.load(tmp_path, device="cpu", quantize=spec)
        mods = [m for m in llm.model.modules() if isinstance(m, quant.Packed)]
        assert any(isinstance(m, quant.QExperts) for m in mods)
        kl, top1 = kl_top1(ref, llm.logits(ids))
        # a router whose top-k flips on a rounding picks another expert: at init range 0.3 that
        # doubles int8's KL here (0.076); int4 stays inside verify's thresholds
        th = {"kl": 0.15, "top1_agreement": 0.85} if spec == "int8" else QUANT_THRESHOLDS[4]
        assert kl <= th["kl"] and top1 >= th["top1_agreement"], (spec, kl, top1)
        if spec == "int4":
            assert any(not m.kernel for m in mods) and any(m.kernel for m in mods)
        out = llm.generate(ids[0].tolist(), max_new_tokens=5, temperature=0)   # absorbed decode steps
        full = llm.logits([ids[0].tolist() + out.token_ids[:-1]])[0, -5:].argmax(-1).tolist()
        assert full == out.token_ids


def test_cli_errors_and_info(checkpoints):
    path = str(checkpoints["llama-mha"])
    r = run_cli("generate", "-m", path, "hi", "--quantize", "int5")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "minillm: error: unknown quantization 'int5'" in r.stderr
    r = run_cli("info", "-m", path, "--quantize", "int4:g128", "--json")
    d = json.loads(r.stdout)
    q = d["quantization"]
    # per layer down (K = 128) fits a group of 128, qkv, o and gate_up (K = 64) do not; the head is int8
    assert q["scheme"] == "int4:g128" and q["dequantized_layers"] == 6 and q["kernel_layers"] == 3
    assert d["weight_bytes"] == sum(q["bytes_by_type"].values()) < d["weight_bytes_by_dtype"]["float32"]
    r = run_cli("generate", "-m", path, "def", "-n", "4", "--temperature", "0", "--quantize", "int8")
    assert r.returncode == 0 and r.stderr == "", r.stderr


RSS_SCRIPT = """
import json, sys, torch, minillm
from minillm.bench import PeakRssAnon
with PeakRssAnon() as mem:
    llm = minillm.load(sys.argv[1], device="cpu", quantize=sys.argv[2])
print(json.dumps({"growth": mem.growth, "bytes": sum(p.numel() * p.element_size() for p in llm.model.parameters())}))
"""


def test_quantized_load_memory(tmp_path):
    """RssAnon while loading grows by about the quantized bytes, not by the fp32 weights."""
    import transformers

    from minillm.random_checkpoint import save_random_model
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    save_random_model(tmp_path, cfg, seed=0)
    fp32 = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    for spec in ("int8", "int4"):
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path), spec], capture_output=True, text=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        # bytes: the int8 / int4 weights and the fp32 untied embedding (2 MiB); on top, one checkpoint
        # tensor's fp32 temporaries at a time and what the load imports (13 .. 23 MiB measured here)
        assert m["growth"] < m["bytes"] + 32 * 2**20 and m["growth"] < fp32 / 2, (spec, m, fp32)

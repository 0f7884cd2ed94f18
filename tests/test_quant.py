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
    q, d = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and d.shape == (48, 1)
    # symmetric, one fp16 scale per output row, q rounded against the stored scale
    assert d.dtype == torch.float16 and torch.allclose(d.float()[:, 0], w.abs().amax(1) / 127, rtol=1e-3)
    err = (quant.dequantize_int8(q, d) - w).abs()
    assert (err <= d.float() / 2 + 1e-7).all()               # round to nearest: half a step at most
    assert ((q.abs() >= 126).sum(1) >= 1).all()              # each row's largest value uses the range


@pytest.mark.parametrize("group", [32, 64])
def test_int4_round_trip(group):
    w = torch.randn(32, 128) + torch.linspace(-2, 2, 128)    # groups with offsets: asymmetry matters
    q, d, m = quant.quantize_int4(w, group)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and d.shape == m.shape == (32, 128 // group)
    g = w.view(32, -1, group)                                # plain torch: q d + m, min at q = 0
    assert torch.allclose(d.float(), (g.amax(-1) - g.amin(-1)) / 15, rtol=1e-3)
    assert torch.allclose(m.float(), g.amin(-1), rtol=1e-3, atol=1e-3)
    err = (quant.dequantize_int4(q, d, m, group) - w).abs().view(32, -1, group)
    assert (err <= d.float()[..., None] / 2 + 2e-3).all()    # + the fp16 min's rounding


@pytest.mark.parametrize("bits", [8, 4])
def test_partial_last_group_round_trip(bits):
    """A dequantized layer whose K is not a multiple of the group (SmolLM2's 576 with groups of
    128): the last group is short, and every value still comes back within half a step."""
    w = torch.randn(8, 576) + torch.linspace(-1, 1, 576)
    if bits == 8:
        q, d = quant.quantize_int8(w, 128)
        back, step = quant.dequantize_int8(q, d, group=128), d.float()
    else:
        q, d, m = quant.quantize_int4(w, 128)
        back, step = quant.dequantize_int4(q, d, m, 128), d.float()
    assert d.shape == (8, 5)
    assert ((back - w).abs() <= step.repeat_interleave(128, 1)[:, :576] / 2 + 2e-3).all()


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
    return m, w


@pytest.mark.parametrize("spec,N,K,kernel", [("int8", 40, 96, True), ("int8", 40, 72, False), ("int4", 96, 128, True),
                                             ("int4:g64", 48, 192, True), ("int4:g128", 48, 96, False), ("int4:g128", 16, 192, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_product_equals_dequantized_weight(spec, N, K, kernel, dtype):
    """Decode rows (the C loops), prefill rows (dequantized into a matmul) and the fallback."""
    scheme = quant.parse(spec)
    m, w = filled(N, K, scheme, parts=3)
    assert m.kernel == kernel   # K = 72 (not blocks of 32), K = 96 with groups of 128: dequantized
    if scheme.bits == 8:
        dq = quant.dequantize_int8(*quant.quantize_int8(w))
    else:
        dq = quant.dequantize_int4(*quant.quantize_int4(w, scheme.group), scheme.group)
    assert torch.allclose(m.dense(), dq, atol=1e-6)
    from minillm.kernels import cpu_gemv
    for M in (1, 5, 8, 9, 33):
        x = torch.randn(M, K).to(dtype)
        ref = F.linear(x.float(), dq)
        got = m.mm(x)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2   # bf16: the output's (and prefill's weights') rounding
        if kernel and cpu_gemv.available():
            # integer products over x rounded to int8 per 32 values (llama.cpp's Q8_0 activations)
            # for decode rows, the same rounded x times the dequantized weight for more (prefill):
            # their reference to fp32 rounding; within a few percent of the float product
            exact = (cpu_gemv.gemv_int8_ref(x.float(), m.qweight, m.scales) if scheme.bits == 8 else
                     cpu_gemv.gemv_int4_ref(x.float(), m.qweight, m.scales, m.mins))
            assert (got.float() - exact).abs().max() <= tol * exact.abs().max(), (M, dtype)
            tol = 5e-2
        assert (got.float() - ref).abs().max() <= tol * ref.abs().max(), (M, dtype)


def test_fused_rows_and_experts_fill_like_one_tensor():
    """Rows filled in parts (qkv from q, k, v) store what one fill stores, for each stacked expert."""
    torch.manual_seed(0)
    a, w = filled(80, 64, quant.parse("int4"), parts=1, lead=(3,))
    b = quant.Packed((3,), 80, 64, quant.parse("int4"))
    for p in b.parameters():
        p.data = torch.empty_like(p, device="cpu")
    for e in range(3):
        for r0, r1 in ((0, 16), (16, 61), (61, 80)):
            b.fill(e, (r0, r1), w[e, r0:r1])
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("qweight", "scales", "mins"))
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

    def scale_off(w, group=0):
        q, d = orig8(w, group)
        return q, (d.float() * 1.1).half()
    monkeypatch.setattr(quant, "quantize_int8", scale_off)
    assert not verify(str(checkpoints["llama-mha"]), quantize="int8", reference=saved_reference).passed

    def transposed(w, group):    # groups of `group` rows instead of columns
        q, d, m = orig4(w.t().contiguous(), group)
        N, K = w.shape
        return q.t().contiguous(), d.reshape(N, K // group), m.reshape(N, K // group)
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
        # doubles int8's KL here (0.076 with float activations, 0.175 since the decode products
        # round x to int8 too); int4 stays inside verify's thresholds
        th = {"kl": 0.25, "top1_agreement": 0.85} if spec == "int8" else QUANT_THRESHOLDS[4]
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

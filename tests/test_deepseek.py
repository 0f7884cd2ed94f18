"""DeepSeek-V2-Lite, V2 and V3 (and V3 as published: FP8 with the MTP layer) against transformers:
logits, greedy generation, cached decoding, absorbed vs materialised MLA, the latent cache's size."""
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import BOS, EOS, VOCAB, build_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file

import minillm
from minillm.archs import deepseek
from minillm.loader import LoadError
from minillm.mla import MLAttention

TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
            num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256,
            initializer_range=0.3, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
            beta_fast=32, beta_slow=1)
VARIANTS = {   # name -> (transformers class, config beyond TINY)
    # V2-Lite: one q projection, greedy softmax routing, two shared experts; YaRN, mscale != all_dim
    "v2-lite-yarn": ("DeepseekV2", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                                        rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.707})),
    # V2: low-rank q, group-limited routing (3 experts from the 2 best of 4 groups: not what greedy
    # would pick), routed_scaling_factor != 1, attention biases
    "v2": ("DeepseekV2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                              num_experts_per_tok=3, routed_scaling_factor=2.5, n_shared_experts=1,
                              attention_bias=True)),
    # V3: sigmoid noaux_tc with a correction bias, normalised weights, YaRN as the hub has it
    "v3": ("DeepseekV3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                              routed_scaling_factor=2.5, n_shared_experts=1,
                              rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
}
FP8_BLOCK = [16, 24]   # small enough for tiny shapes, and leaves partial blocks at the edges
NAMES = [*VARIANTS, "v3-fp8"]


def build(name, folder):
    import transformers
    cls, extra = VARIANTS[name]
    config = getattr(transformers, cls + "Config")(**{**TINY, **extra})
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):   # zero by default: make it decide something
                m.e_score_correction_bias.uniform_(-0.5, 0.5)
    model.generation_config = transformers.GenerationConfig(bos_token_id=BOS, eos_token_id=EOS)
    model.save_pretrained(folder)
    build_tokenizer(folder, True)


def quantize(w, block):
    """Block-wise FP8 as DeepSeek-V3 publishes it -> (float8_e4m3fn weight, float32 scale_inv per
    block, and the dequantised weight, block by block)."""
    bo, bi = block
    rows, cols = w.shape
    scale = torch.zeros(math.ceil(rows / bo), math.ceil(cols / bi))
    q, deq = torch.empty(rows, cols, dtype=torch.float8_e4m3fn), torch.empty(rows, cols)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            at = (slice(i * bo, (i + 1) * bo), slice(j * bi, (j + 1) * bi))   # partial at the edges
            scale[i, j] = w[at].abs().max() / 448.0                            # e4m3's largest value
            q[at] = (w[at] / scale[i, j]).to(torch.float8_e4m3fn)
            deq[at] = q[at].float() * scale[i, j]
    return q, scale, deq


def build_fp8(src, folder, twin):
    """`folder`: src as V3/R1 are published (FP8 linears + weight_scale_inv, an MTP layer, two shards,
    a scale in another shard than its weight). `twin`: the same dequantised weights in fp32, which
    transformers reads (its own FP8 loader rejects partial blocks)."""
    import shutil
    shutil.copytree(src, twin)
    shutil.copytree(src, folder)
    with safe_open(src / "model.safetensors", "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    fp8, deq = {}, {}
    for k, w in sd.items():
        if w.dim() == 2 and "embed" not in k and "lm_head" not in k and not k.endswith("mlp.gate.weight"):
            fp8[k], fp8[k + "_scale_inv"], deq[k] = quantize(w, FP8_BLOCK)
        else:
            fp8[k] = deq[k] = w
    mtp = "model.layers.3."   # the multi-token-prediction layer, with FP8 weights of its own
    for k, shape in (("eh_proj", (64, 128)), ("self_attn.kv_b_proj", (112, 16))):
        w, s, _ = quantize(torch.randn(shape), FP8_BLOCK)
        fp8[f"{mtp}{k}.weight"], fp8[f"{mtp}{k}.weight_scale_inv"] = w, s
    fp8[mtp + "enorm.weight"] = torch.ones(64)
    save_file(deq, twin / "model.safetensors", metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    moved = "model.layers.1.self_attn.q_b_proj.weight_scale_inv"
    second = {k for k in fp8 if "layers.1." in k and k != moved}
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in fp8.items() if k not in second},
              "model-00002-of-00002.safetensors": {k: v for k, v in fp8.items() if k in second}}
    for file, part in shards.items():
        save_file(part, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, part in shards.items() for k in part}}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": FP8_BLOCK}
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (the checkpoint minillm loads, the one transformers loads as the reference)."""
    root = tmp_path_factory.mktemp("deepseek")
    out = {}
    for name in VARIANTS:
        build(name, root / name)
        out[name] = (root / name, root / name)
    build_fp8(root / "v3", root / "v3-fp8", root / "v3-fp8-twin")
    out["v3-fp8"] = (root / "v3-fp8", root / "v3-fp8-twin")
    return out


@pytest.fixture(scope="module")
def llms(folders):
    return {name: minillm.load(path, device="cpu") for name, (path, _) in folders.items()}


def ids_for(seed, B=2, T=21):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def set_absorb(model, mode):
    model.run = replace(model.run, mla_absorb=mode)   # read by every layer through the Step


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, llms, folders, reference):
    ids = ids_for(0)
    with torch.no_grad():
        ref = reference(folders[name][1])(ids).logits
    ours = llms[name].logits(ids)
    assert ours.shape == ref.shape and close(ours, ref)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(name, llms, folders, reference):
    llm = llms[name]
    prompt = llm.tokenizer.encode("def fibonacci(n):")
    ref = reference(folders[name][1]).generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    assert llm.generate(prompt, max_new_tokens=24, temperature=0).token_ids == ref[0, len(prompt):].tolist()


def cached_logits(model, ids, chunks):
    cache = model.new_cache(ids.shape[0], 32)
    rows, t = [], 0
    with torch.inference_mode():
        for n in chunks:
            rows.append(model(ids[:, t:t + n], t, cache))
            t += n
    return torch.cat(rows, 1)


@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_equals_full_forward(name, llms):
    llm = llms[name]
    ids = ids_for(1, T=20)
    full = llm.logits(ids)
    assert close(cached_logits(llm.model, ids, [8, 5] + [1] * 7), full)   # prefill, chunk, decode


@pytest.mark.parametrize("name", NAMES)
def test_absorbed_decode_equals_materialised(name, llms, monkeypatch):
    model = llms[name].model
    ids = ids_for(2, T=16)
    chunks = [6] + [1] * 10
    try:
        set_absorb(model, "never")
        materialised = cached_logits(model, ids, chunks)
        set_absorb(model, "always")   # the prefill too: the latent path with a causal mask
        absorbed = cached_logits(model, ids, chunks)
        set_absorb(model, "auto")     # decode steps must take the absorbed path by themselves
        calls = []
        real = MLAttention.materialised
        monkeypatch.setattr(MLAttention, "materialised",
                            lambda self, q, *a: calls.append(q.shape[1]) or real(self, q, *a))
        auto = cached_logits(model, ids, chunks)
    finally:
        set_absorb(model, "auto")
    assert close(absorbed, materialised) and close(auto, materialised)
    assert calls == [6] * model.cfg.num_layers   # only the prefill materialised K/V


def test_cache_holds_only_the_latent(llms):
    for llm in llms.values():
        cfg = llm.config
        cache = llm.model.new_cache(2, 32)
        assert set(cache.tensors) == {"c_kv", "k_pe"}
        per_token = cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        assert cache.nbytes == 2 * 32 * per_token * 4          # fp32
        assert per_token < cfg.num_layers * cfg.num_heads * (cfg.head_dim + cfg.v_head_dim)


def test_batch_of_unequal_prompts_equals_one_by_one(llms):
    llm = llms["v3"]   # decode steps at different positions: the absorbed path with a mask
    prompts = ["def fibonacci(n):", "The quick brown fox jumps", "import os"]
    batch = llm.generate(prompts, max_new_tokens=10, temperature=0)
    for prompt, got in zip(prompts, batch):
        assert got.token_ids == llm.generate(prompt, max_new_tokens=10, temperature=0).token_ids


def test_fp8_checkpoint_equals_its_dequantised_twin(folders, llms):
    path, twin = folders["v3-fp8"]
    with safe_open(path / "model-00001-of-00002.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")   # (24, 64)
    assert w.dtype == torch.float8_e4m3fn and (24 % FP8_BLOCK[0], 64 % FP8_BLOCK[1]) != (0, 0)
    ours = dict(llms["v3-fp8"].model.named_parameters())
    plain = dict(minillm.load(twin, device="cpu").model.named_parameters())
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)


def test_fp8_errors(folders, tmp_path):
    import shutil
    path = folders["v3-fp8"][0]
    shutil.copytree(path, tmp_path / "noquant")
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "noquant" / "config.json").write_text(json.dumps({**cfg, "quantization_config": None}))
    with pytest.raises(LoadError, match="weight_scale_inv|weight_block_size"):
        minillm.load(tmp_path / "noquant", device="cpu")
    shutil.copytree(path, tmp_path / "awq")
    awq = {**cfg, "quantization_config": {"quant_method": "awq"}}
    (tmp_path / "awq" / "config.json").write_text(json.dumps(awq))
    with pytest.raises(LoadError, match="unsupported quantization 'awq'"):
        minillm.load(tmp_path / "awq", device="cpu")


def test_correction_bias_decides_and_stays_fp32(folders, llms):
    model = llms["v3"].model
    moe = model.layers[1].mlp
    ids = ids_for(3)
    x = model.embed(ids).reshape(-1, 64)
    with_bias = moe.route(x)[1]
    saved = moe.e_score_correction_bias.clone()
    moe.e_score_correction_bias.zero_()
    without = moe.route(x)[1]
    moe.e_score_correction_bias.copy_(saved)
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values)
    bf16 = minillm.load(folders["v3"][0], device="cpu", dtype="bfloat16").model
    assert bf16.layers[1].mlp.e_score_correction_bias.dtype == torch.float32
    assert bf16.layers[1].mlp.router.weight.dtype == torch.bfloat16


def test_hub_config_spelling(folders, llms, tmp_path):
    """The hub's config.json says rope_scaling {type: yarn, ...} + rope_theta, scoring_func etc."""
    import shutil
    src = folders["v2-lite-yarn"][0]
    shutil.copytree(src, tmp_path / "hub")
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope.pop("rope_theta"), scoring_func="softmax", moe_layer_freq=1,
               rope_scaling={**{k: v for k, v in rope.items() if k != "rope_type"}, "type": "yarn"})
    (tmp_path / "hub" / "config.json").write_text(json.dumps(cfg))
    ids = ids_for(4)
    hub = minillm.load(tmp_path / "hub", device="cpu")
    assert hub.config == llms["v2-lite-yarn"].config
    assert torch.equal(hub.logits(ids), llms["v2-lite-yarn"].logits(ids))


# the published configs, as far as the cache and the routing are concerned
V2_LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
               moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
               num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
               num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1,
               topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
               max_position_embeddings=163840, rope_theta=10000, rms_norm_eps=1e-6,
               rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=0.707,
                                 mscale_all_dim=0.707, original_max_position_embeddings=4096))
V3 = dict(V2_LITE, model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
          moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
          q_lora_rank=1536, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
          first_k_dense_replace=3, n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid",
          norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
          rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
                            original_max_position_embeddings=4096))


def test_published_configs():
    lite, v3 = deepseek.to_config(V2_LITE), deepseek.to_config(V3)
    assert lite.moe_layers == list(range(1, 27)) and v3.moe_layers == list(range(3, 61))
    assert (lite.topk_method, lite.norm_topk_prob, v3.topk_method, v3.norm_topk_prob) == \
        ("greedy", False, "noaux_tc", True)
    m = 0.1 * 0.707 * math.log(40) + 1
    assert lite.attn_scale == pytest.approx(192 ** -0.5 * m * m)
    shapes = MLAttention.cache_shapes(v3)
    assert sum(s[0] for s in shapes.values()) == 576                      # 512 + 64 values per layer
    with pytest.raises(ValueError, match="router"):
        deepseek.to_config(dict(V3, scoring_func="softmax"))


def test_missing_expert_is_named_as_the_checkpoint_names_it(folders, tmp_path):
    """Stacked experts are filled from one tensor per expert: a missing one is reported by its own
    name, not as an unfilled slice of layers.1.mlp.experts_gate_up."""
    import shutil

    from safetensors.torch import load_file
    src = folders["v3"][0]
    shutil.copytree(src, tmp_path / "v3")
    file = next((tmp_path / "v3").glob("*.safetensors"))
    sd = load_file(file)
    sd.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    save_file(sd, file, metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight': "
                                        r"not in model\.safetensors"):
        minillm.load(tmp_path / "v3", device="cpu")

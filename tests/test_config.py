"""Adapters read configs as the hub publishes them (both rope spellings), and RoPE frequencies
equal transformers' for every scaling kind."""
import pytest
import torch

from minillm import archs
from minillm.rope import rope_frequencies

# as published (abridged to the fields that matter)
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "head_dim": 128,
    "intermediate_size": 3072, "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "tie_word_embeddings": True, "vocab_size": 151936,
    "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"}
GPT2_HUB = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
            "layer_norm_epsilon": 1e-05, "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256}
LLAMA2_OLD = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
              "num_attention_heads": 32, "num_hidden_layers": 32, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-05, "vocab_size": 32000, "rope_scaling": {"type": "linear", "factor": 2.0},
              "bos_token_id": 1, "eos_token_id": 2}   # no model_type, no num_key_value_heads


def to_config(hf):
    return archs.pick(hf).to_config(hf)


def test_published_configs():
    c = to_config(LLAMA32_1B)
    assert (c.arch, c.num_kv_heads, c.head_dim, c.tie_embeddings) == ("llama", 8, 64, True)
    assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3"
    q = to_config(QWEN3_06B)
    assert q.qk_norm and q.head_dim == 128 and q.num_heads * q.head_dim == 2048 != q.hidden_size
    assert q.rope_scaling is None and q.rope_theta == 1e6 and q.eos_token_ids == [151645]
    g = to_config(GPT2_HUB)
    assert (g.norm, g.pos, g.act, g.gated_mlp, g.head_dim) == ("layer", "learned", "gelu_new", False, 64)
    old = to_config(LLAMA2_OLD)   # picked by `architectures`, MHA by default, old rope spelling
    assert old.num_kv_heads == 32 and old.rope_scaling == {
        "rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 4096}


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match=r"unknown architecture 'mamba'.*llama.*qwen3"):
        archs.pick({"model_type": "mamba", "architectures": ["MambaForCausalLM"]})


SCALINGS = [
    None,
    {"type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: str(s and s.get("type", s.get("rope_type"))))
@pytest.mark.parametrize("spelling", ["hub", "rope_parameters"])
def test_rope_frequencies_match_transformers(scaling, spelling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = dict(LLAMA32_1B, max_position_embeddings=131072, rope_theta=50000.0, head_dim=128)
    hf.pop("rope_scaling")
    if scaling and spelling == "hub":
        hf["rope_scaling"] = dict(scaling)
    elif scaling:
        params = {k: v for k, v in scaling.items() if k != "type"}
        hf["rope_parameters"] = {"rope_type": scaling.get("type", scaling.get("rope_type")),
                                 "rope_theta": hf.pop("rope_theta"), **params}
    cfg = to_config(hf)
    ours, our_scale = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position)
    hfc = LlamaConfig(**hf)
    kind = hfc.rope_parameters["rope_type"]
    if kind == "default":
        ref, ref_scale = 1.0 / (50000.0 ** (torch.arange(0, 128, 2).float() / 128)), 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](hfc, "cpu")
    assert torch.equal(ours, ref) and our_scale == pytest.approx(ref_scale)


def test_activations_are_named_in_one_place():
    from minillm.config import ACTIVATIONS
    from minillm.layers import ACTS
    assert set(ACTS) == set(ACTIVATIONS)
    with pytest.raises(ValueError, match=r"unsupported activation 'xielu' \(supported: silu"):
        to_config({**LLAMA32_1B, "hidden_act": "xielu"})

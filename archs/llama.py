"""Llama 2 / 3.x (and checkpoints of the same layout: Mistral, Qwen2).

RMSNorm, RoPE (default, linear, llama3 scaling), SiLU-gated MLP, GQA. q/k/v are fused into one
`qkv` parameter and gate/up into `gate_up`, each checkpoint tensor filling its rows.
"""
import re

from minillm.config import Config

from . import IGNORE, Target, fused_rows, rope_settings, token_ids

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def to_config(hf: dict, **overrides) -> Config:
    context = hf.get("max_position_embeddings", 2048)
    if hf.get("sliding_window") and (hf.get("use_sliding_window") or hf.get("model_type") == "mistral"
                                     or "sliding_attention" in (hf.get("layer_types") or [])):
        # Mistral v0.1, Qwen2 with use_sliding_window: within the window, sliding-window attention
        # is full causal attention, so cap the context there: exact, never an approximation
        context = min(context, hf["sliding_window"])
    theta, scaling = rope_settings(hf)
    heads = hf["num_attention_heads"]
    fields = dict(
        arch=hf.get("model_type", "llama"), vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"], max_position=context,
        norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), pos="rope", rope_theta=theta,
        rope_scaling=scaling, act=hf.get("hidden_act", "silu"), gated_mlp=True,
        qkv_bias=hf.get("attention_bias", hf.get("model_type") == "qwen2"),
        o_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False), **token_ids(hf))
    fields.update(overrides)
    return Config(**fields)


TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
       "lm_head.weight": "head.weight"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
         "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}


def targets(name: str, cfg: Config):
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return IGNORE                     # a tied head saved anyway: the embedding is the head
    if name in TOP:
        return [Target(TOP[name])]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias|inv_freq)", name)
    if not m:
        return None
    i, module, kind = m.groups()
    layer = f"layers.{i}"
    if module == "self_attn.rotary_emb":  # old checkpoints saved the RoPE buffer; it is recomputed
        return IGNORE
    D = cfg.head_dim
    qkv = (cfg.num_heads * D, cfg.num_kv_heads * D, cfg.num_kv_heads * D)
    parts = {"self_attn.q_proj": ("attn.qkv", qkv, 0), "self_attn.k_proj": ("attn.qkv", qkv, 1),
             "self_attn.v_proj": ("attn.qkv", qkv, 2),
             "mlp.gate_proj": ("mlp.gate_up", (cfg.intermediate_size,) * 2, 0),
             "mlp.up_proj": ("mlp.gate_up", (cfg.intermediate_size,) * 2, 1)}
    if module in parts:
        core, sizes, index = parts[module]
        return [Target(f"{layer}.{core}.{kind}", rows=fused_rows(sizes, index))]
    plain = {"self_attn.o_proj": "attn.o", "mlp.down_proj": "mlp.down", **NORMS}
    if module in plain:
        return [Target(f"{layer}.{plain[module]}.{kind}")]
    return None


def names(cfg: Config, present=()) -> list[str]:
    out = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    for i in range(cfg.num_layers):
        out += attention_names(cfg, i) + mlp_names(cfg, i)
    return out


def attention_names(cfg: Config, i: int) -> list[str]:
    p = f"model.layers.{i}."
    out = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    out += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
    out += [f"{p}self_attn.{x}_proj.bias" for x in "qkv" if cfg.qkv_bias]
    out += [f"{p}self_attn.o_proj.bias"] if cfg.o_bias else []
    out += [f"{p}self_attn.{x}_norm.weight" for x in "qk" if cfg.qk_norm]
    return out


def mlp_names(cfg: Config, i: int) -> list[str]:
    kinds = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    return [f"model.layers.{i}.mlp.{x}_proj.{k}" for x in ("gate", "up", "down") for k in kinds]

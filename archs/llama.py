"""Llama 2 / 3.x (and checkpoints of the same layout: Mistral, Qwen2).

RMSNorm, RoPE (default, linear, llama3 scaling), SiLU-gated MLP, GQA. q/k/v are fused into one
`qkv` parameter and gate/up into `gate_up`, each checkpoint tensor filling its rows.
"""
import re

from minillm.config import Config

from . import IGNORE, Target, fused_rows, gguf_fields, gguf_rope, gguf_token_ids, rope_settings, token_ids

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


# --- GGUF (llama.cpp's converter, convert_hf_to_gguf.py) ------------------------------------------
GGUF_ARCHS = ("llama", "qwen2")
GGUF_CONFIG = {"embedding_length": "hidden_size", "block_count": "num_hidden_layers",
               "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
               "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
               "context_length": "max_position_embeddings", "attention.layer_norm_rms_epsilon": "rms_norm_eps"}


def gguf_config(meta: dict, shapes: dict) -> dict:
    """The config.json fields a GGUF file holds (a head is tied when the file has no output.weight)."""
    return {"model_type": meta["general.architecture"], **gguf_fields(meta, GGUF_CONFIG),
            "vocab_size": shapes["token_embd.weight"][0], "rope_parameters": gguf_rope(meta),
            "tie_word_embeddings": "output.weight" not in shapes, **gguf_token_ids(meta)}


def gguf_biases(shapes: dict) -> dict:
    return {"qkv_bias": "blk.0.attn_q.bias" in shapes or "blk.0.attn_qkv.bias" in shapes,
            "o_bias": "blk.0.attn_output.bias" in shapes, "mlp_bias": "blk.0.ffn_up.bias" in shapes}


def from_gguf(meta: dict, shapes: dict, read):
    hf = gguf_config(meta, shapes)
    cfg = to_config(hf, **gguf_biases(shapes))
    if "rope_freqs.weight" in shapes:
        # Llama 3.x: llama.cpp's converter drops rope_scaling {rope_type: llama3} from the metadata and
        # writes its per-frequency divisors as this tensor instead (LlamaModel.generate_extra_tensors)
        cfg.rope_scaling = {"rope_type": "freq_factors", "factors": read("rope_freqs.weight").tolist()}
    return cfg, hf


def unpermute(heads: int):
    """Undo convert_hf_to_gguf.py's LlamaModel.permute of q and k rows (weights and biases): it
    interleaves each head's two rotary halves for llama.cpp's rope; minillm rotates halves, as HF."""
    return lambda w: w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_TOP = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight",
            "output.weight": "head.weight"}
GGUF_LAYER = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q_norm": "attn.q_norm",
              "attn_k_norm": "attn.k_norm", "attn_output": "attn.o", "ffn_down": "mlp.down"}


def gguf_targets(name: str, cfg: Config):
    if name == "rope_freqs.weight":       # read into cfg.rope_scaling by from_gguf
        return IGNORE
    if name in GGUF_TOP:
        return [Target(GGUF_TOP[name])]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m:
        return None
    i, module, kind = m.groups()
    D, layer = cfg.head_dim, f"layers.{i}"
    qkv = (cfg.num_heads * D, cfg.num_kv_heads * D, cfg.num_kv_heads * D)
    permuted = cfg.arch == "llama"        # the converter permutes for `llama` only (not qwen2, qwen3)
    if module in ("attn_q", "attn_k", "attn_v"):
        part = ("attn_q", "attn_k", "attn_v").index(module)
        heads = (cfg.num_heads, cfg.num_kv_heads, None)[part]
        undo = unpermute(heads) if permuted and heads else None
        return [Target(f"{layer}.attn.qkv.{kind}", rows=fused_rows(qkv, part), transform=undo)]
    if module == "attn_qkv":              # the converter's optional q/k/v fusion
        if not permuted:
            return [Target(f"{layer}.attn.qkv.{kind}")]
        return [Target(f"{layer}.attn.qkv.{kind}", rows=fused_rows(qkv, p),
                       transform=lambda w, p=p, h=h: unpermute(h)(w[slice(*fused_rows(qkv, p))]) if h
                       else w[slice(*fused_rows(qkv, p))])
                for p, h in enumerate((cfg.num_heads, cfg.num_kv_heads, None))]
    if module in ("ffn_gate", "ffn_up"):
        rows = fused_rows((cfg.intermediate_size,) * 2, ("ffn_gate", "ffn_up").index(module))
        return [Target(f"{layer}.mlp.gate_up.{kind}", rows=rows)]
    if module in GGUF_LAYER:
        return [Target(f"{layer}.{GGUF_LAYER[module]}.{kind}")]
    return None

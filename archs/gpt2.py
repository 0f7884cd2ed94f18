"""GPT-2 (openai-community/gpt2 and transformers' GPT2LMHeadModel).

LayerNorm, learned positions, gelu_new, biases everywhere, head tied to the embedding. Its
Conv1D layers store weights as (in, out): transposed here to the (out, in) of nn.Linear. The hub
file has no `transformer.` prefix and no lm_head, and carries the causal-mask buffers
`h.N.attn.bias` / `h.N.attn.masked_bias`, which are dropped.
"""
import re

from minillm.config import Config

from . import IGNORE, Target, gguf_fields, gguf_token_ids, token_ids

MODEL_TYPES = ("gpt2",)
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")


def to_config(hf: dict) -> Config:
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(f"gpt2 option {flag}=true is not supported")
    C = hf["n_embd"]
    return Config(
        arch="gpt2", vocab_size=hf["vocab_size"], hidden_size=C, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], num_kv_heads=hf["n_head"], head_dim=C // hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * C, max_position=hf["n_positions"],
        norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos="learned",
        act=hf.get("activation_function", "gelu_new"), gated_mlp=False,
        qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True,
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0, **token_ids(hf))


def _t(w):  # Conv1D (in, out) -> Linear (out, in)
    return w.t()


LAYER = {
    "ln_1.weight": ("attn_norm.weight", None), "ln_1.bias": ("attn_norm.bias", None),
    "ln_2.weight": ("mlp_norm.weight", None), "ln_2.bias": ("mlp_norm.bias", None),
    "attn.c_attn.weight": ("attn.qkv.weight", _t), "attn.c_attn.bias": ("attn.qkv.bias", None),
    "attn.c_proj.weight": ("attn.o.weight", _t), "attn.c_proj.bias": ("attn.o.bias", None),
    "mlp.c_fc.weight": ("mlp.up.weight", _t), "mlp.c_fc.bias": ("mlp.up.bias", None),
    "mlp.c_proj.weight": ("mlp.down.weight", _t), "mlp.c_proj.bias": ("mlp.down.bias", None),
}
TOP = {"wte.weight": "embed.weight", "wpe.weight": "pos_embed.weight",
       "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}


def targets(name: str, cfg: Config):
    name = name.removeprefix("transformer.")
    if name == "lm_head.weight":          # tied to wte: the same tensor, saved twice
        return IGNORE
    if name in TOP:
        return [Target(TOP[name])]
    m = re.fullmatch(r"h\.(\d+)\.(.+)", name)
    if not m:
        return None
    i, rest = m.groups()
    if rest in ("attn.bias", "attn.masked_bias"):   # causal-mask buffers, not weights
        return IGNORE
    if rest in LAYER:
        core, transform = LAYER[rest]
        return [Target(f"layers.{i}.{core}", transform=transform)]
    return None


def names(cfg: Config, present=()) -> list[str]:
    """The hub's file has no `transformer.` prefix; transformers' save_pretrained writes one."""
    pre = "transformer." if any(n.startswith("transformer.") for n in present) else ""
    layers = [f"{pre}h.{i}.{rest}" for i in range(cfg.num_layers) for rest in LAYER]
    return [pre + n for n in TOP] + layers


# --- GGUF: llama.cpp's converter already transposed the Conv1D weights to (out, in) ----------------
GGUF_ARCHS = ("gpt2",)
GGUF_CONFIG = {"embedding_length": "n_embd", "block_count": "n_layer", "attention.head_count": "n_head",
               "feed_forward_length": "n_inner", "context_length": "n_positions",
               "attention.layer_norm_epsilon": "layer_norm_epsilon"}
GGUF_TOP = {"token_embd.weight": "embed.weight", "position_embd.weight": "pos_embed.weight",
            "output_norm.weight": "norm.weight", "output_norm.bias": "norm.bias", "output.weight": "head.weight"}
GGUF_LAYER = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_qkv": "attn.qkv", "attn_output": "attn.o",
              "ffn_up": "mlp.up", "ffn_down": "mlp.down"}


def from_gguf(meta: dict, shapes: dict, read):
    # context_length is GPT-2's n_positions (the wpe rows), whatever transformers' reader makes of it
    hf = {"model_type": "gpt2", **gguf_fields(meta, GGUF_CONFIG), "vocab_size": shapes["token_embd.weight"][0],
          **gguf_token_ids(meta)}
    cfg = to_config(hf)
    cfg.tie_embeddings = "output.weight" not in shapes   # llama.cpp: output falls back to token_embd
    return cfg, hf


def gguf_targets(name: str, cfg: Config):
    if name in GGUF_TOP:
        return [Target(GGUF_TOP[name])]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m[2] in GGUF_LAYER:
        return [Target(f"layers.{m[1]}.{GGUF_LAYER[m[2]]}.{m[3]}")]
    return None

"""DeepSeek-V2 / V2-Lite (`deepseek_v2`) and V3 / R1 (`deepseek_v3`): MLA (minillm/mla.py) + MoE
(minillm/moe.py). As transformers: YaRN's mscale_all_dim squared into the softmax scale, MoE in every
layer from first_k_dense_replace on (moe_layer_freq ignored; it is 1 in every published config).
The multi-token-prediction layer of V3/R1 (index num_hidden_layers) is ignored; their FP8 weights
are dequantised by the loader."""
import re

from minillm.config import Config
from minillm.rope import get_mscale

from . import IGNORE, Target, fused_rows, gguf_fields, llama, rope_settings

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
ROUTERS = {"v2": ("softmax", ("greedy", "group_limited_greedy")), "v3": ("sigmoid", ("noaux_tc",))}


def to_config(hf: dict) -> Config:
    v3 = hf.get("model_type") == "deepseek_v3" or "DeepseekV3ForCausalLM" in (hf.get("architectures") or [])
    scoring, methods = ROUTERS["v3" if v3 else "v2"]   # transformers picks the router by class
    method = hf.get("topk_method") or methods[0]
    if hf.get("scoring_func", scoring) != scoring or method not in methods:
        raise ValueError(f"{hf.get('model_type')} router {hf.get('scoring_func')}/{method} is not supported")
    Dn, Dr = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
    scale, yarn = (Dn + Dr) ** -0.5, rope_settings(hf)[1] or {}
    if yarn.get("mscale_all_dim"):
        scale *= get_mscale(yarn["factor"], yarn["mscale_all_dim"]) ** 2
    return llama.to_config(
        hf, arch="deepseek_v3" if v3 else "deepseek_v2", num_kv_heads=hf["num_attention_heads"],
        head_dim=Dn + Dr, attn_scale=scale, attention="mla", q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=Dn, qk_rope_head_dim=Dr,
        v_head_dim=hf["v_head_dim"], rope_interleaved=hf.get("rope_interleave", True),
        moe_layers=list(range(hf.get("first_k_dense_replace") or 0, hf["num_hidden_layers"])),
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=hf["num_experts_per_tok"], moe_intermediate_size=hf["moe_intermediate_size"],
        scoring_func=scoring, topk_method=method, n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, norm_topk_prob=v3 and bool(hf.get("norm_topk_prob")),
        routed_scaling_factor=hf.get("routed_scaling_factor") or 1.0)


ATTN = {"q_proj": "q", "q_a_proj": "q_a", "q_a_layernorm": "q_a_norm", "q_b_proj": "q_b",
        "kv_a_proj_with_mqa": "kv_a", "kv_a_layernorm": "kv_a_norm", "kv_b_proj": "kv_b", "o_proj": "o"}
ROUTER = {"mlp.gate.weight": "mlp.router.weight",
          "mlp.gate.e_score_correction_bias": "mlp.e_score_correction_bias"}
GATE_UP = ("gate", "up")


def targets(name: str, cfg: Config):
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return llama.targets(name, cfg)   # embedding, final norm, head
    i, rest = int(m[1]), m[2]
    if i >= cfg.num_layers:               # multi-token-prediction layer: not used to generate
        return IGNORE
    L, inter = f"layers.{i}", cfg.moe_intermediate_size
    if (a := re.fullmatch(r"self_attn\.(\w+)\.(weight|bias)", rest)) and a[1] in ATTN:
        return [Target(f"{L}.attn.{ATTN[a[1]]}.{a[2]}")]
    if e := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", rest):   # stacked
        if e[2] == "down":
            return [Target(f"{L}.mlp.experts_down", index=int(e[1]))]
        rows = fused_rows((inter, inter), GATE_UP.index(e[2]))
        return [Target(f"{L}.mlp.experts_gate_up", index=int(e[1]), rows=rows)]
    if sh := re.fullmatch(r"mlp\.shared_experts\.(gate|up|down)_proj\.weight", rest):  # fused
        if sh[1] == "down":
            return [Target(f"{L}.mlp.shared.down.weight")]
        rows = fused_rows((inter * cfg.n_shared_experts,) * 2, GATE_UP.index(sh[1]))
        return [Target(f"{L}.mlp.shared.gate_up.weight", rows=rows)]
    if rest in ROUTER:
        return [Target(f"{L}.{ROUTER[rest]}")]
    return llama.targets(name, cfg)       # the norms and the dense layers' MLP


def names(cfg: Config, present=()) -> list[str]:
    out = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    q = ["q_a_proj", "q_a_layernorm", "q_b_proj"] if cfg.q_lora_rank else ["q_proj"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        out += [f"{p}self_attn.{m}.weight" for m in q + ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]]
        if cfg.qkv_bias:
            out += [f"{p}self_attn.{m}.bias" for m in (["q_a_proj"] if cfg.q_lora_rank else []) + ["kv_a_proj_with_mqa"]]
        out += [f"{p}self_attn.o_proj.bias"] if cfg.o_bias else []
        if i not in cfg.moe_layers:
            out += llama.mlp_names(cfg, i)
            continue
        out += [p + "mlp.gate.weight"] + ([p + "mlp.gate.e_score_correction_bias"]
                                          if cfg.topk_method == "noaux_tc" else [])
        out += [f"{p}mlp.experts.{e}.{x}_proj.weight" for e in range(cfg.n_routed_experts)
                for x in ("gate", "up", "down")]
        if cfg.n_shared_experts:
            out += [f"{p}mlp.shared_experts.{x}_proj.weight" for x in ("gate", "up", "down")]
    return out


# --- GGUF: llama.cpp's `deepseek2` (V2, V2-Lite, V3, R1) -----------------------------------------
GGUF_ARCHS = ("deepseek2",)
GGUF_CONFIG = {"attention.q_lora_rank": "q_lora_rank", "attention.kv_lora_rank": "kv_lora_rank",
               "rope.dimension_count": "qk_rope_head_dim", "leading_dense_block_count": "first_k_dense_replace",
               "expert_count": "n_routed_experts", "expert_used_count": "num_experts_per_tok",
               "expert_shared_count": "n_shared_experts", "expert_feed_forward_length": "moe_intermediate_size",
               "expert_weights_scale": "routed_scaling_factor", "expert_weights_norm": "norm_topk_prob",
               "expert_group_count": "n_group", "expert_group_used_count": "topk_group"}
GATING = {1: "softmax", 2: "sigmoid"}    # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE


def from_gguf(meta: dict, shapes: dict, read):
    hf = {**llama.gguf_config(meta, shapes), **gguf_fields(meta, GGUF_CONFIG)}
    a, rope = meta["general.architecture"], hf["qk_rope_head_dim"]
    # MLA as MQA: the converter writes the latent sizes in key_length / value_length (and head_count_kv
    # 1), the real per-head ones in the _mla keys; older files have only the real ones
    key = meta.get(f"{a}.attention.key_length_mla", meta.get(f"{a}.attention.key_length"))
    hf.update(qk_nope_head_dim=key - rope, v_head_dim=meta.get(f"{a}.attention.value_length_mla",
                                                                meta.get(f"{a}.attention.value_length")))
    hf.pop("head_dim", None)
    hf.pop("num_key_value_heads", None)
    scoring = GATING.get(meta.get(f"{a}.expert_gating_func", 1))
    if scoring is None:
        raise ValueError(f"deepseek2 expert_gating_func {meta[f'{a}.expert_gating_func']} is not supported")
    v3 = scoring == "sigmoid"            # V3's router; the file does not name the topk method
    hf.update(model_type="deepseek_v3" if v3 else "deepseek_v2", scoring_func=scoring,
              topk_method="noaux_tc" if v3 else "group_limited_greedy" if hf.get("n_group", 1) > 1 else "greedy")
    yarn = hf["rope_parameters"]
    if yarn.get("rope_type") == "yarn" and f"{a}.rope.scaling.yarn_log_multiplier" in meta:
        # the converter keeps 0.1 * mscale_all_dim; llama.cpp's deepseek2 takes mscale == mscale_all_dim
        yarn["mscale"] = yarn["mscale_all_dim"] = meta[f"{a}.rope.scaling.yarn_log_multiplier"] / 0.1
    hf["attention_bias"] = "blk.0.attn_kv_a_mqa.bias" in shapes
    return to_config(hf), hf


GGUF_ATTN = {"attn_q": "q", "attn_q_a": "q_a", "attn_q_a_norm": "q_a_norm", "attn_q_b": "q_b",
             "attn_kv_a_mqa": "kv_a", "attn_kv_a_norm": "kv_a_norm", "attn_kv_b": "kv_b", "attn_output": "o"}
GGUF_SHARED = {"ffn_gate_shexp": 0, "ffn_up_shexp": 1}


def gguf_targets(name: str, cfg: Config):
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m:
        return llama.gguf_targets(name, cfg)
    i, module, kind = int(m[1]), m[2], m[3]
    L, H, E, inter = f"layers.{i}", cfg.num_heads, cfg.n_routed_experts, cfg.moe_intermediate_size
    Dn, Dv = cfg.qk_nope_head_dim, cfg.v_head_dim
    if module in GGUF_ATTN:
        return [Target(f"{L}.attn.{GGUF_ATTN[module]}.{kind}")]
    if module in ("attn_k_b", "attn_v_b"):
        # the converter splits kv_b per head into k_b (H, R, Dn), transposed, and v_b (H, Dv, R);
        # kv_b holds per head [W_UK (Dn, R); W_UV (Dv, R)]: fill it head by head
        if module == "attn_k_b":
            return [Target(f"{L}.attn.kv_b.weight", rows=(h * (Dn + Dv), h * (Dn + Dv) + Dn),
                           transform=lambda w, h=h: w[h].T) for h in range(H)]
        return [Target(f"{L}.attn.kv_b.weight", rows=(h * (Dn + Dv) + Dn, (h + 1) * (Dn + Dv)),
                       transform=lambda w, h=h: w[h]) for h in range(H)]
    if module in ("ffn_gate_exps", "ffn_up_exps"):   # (E, inter, C) stacked: each expert's gate or up rows
        rows = fused_rows((inter, inter), ("ffn_gate_exps", "ffn_up_exps").index(module))
        return [Target(f"{L}.mlp.experts_gate_up", index=e, rows=rows, transform=lambda w, e=e: w[e])
                for e in range(E)]
    if module == "ffn_gate_up_exps":                 # the converter's optional gate/up fusion
        return [Target(f"{L}.mlp.experts_gate_up")]
    if module == "ffn_down_exps":
        return [Target(f"{L}.mlp.experts_down")]
    if module == "ffn_gate_inp":
        return [Target(f"{L}.mlp.router.weight")]
    if module == "exp_probs_b":                      # V3's e_score_correction_bias
        return [Target(f"{L}.mlp.e_score_correction_bias")]
    if module in GGUF_SHARED:
        rows = fused_rows((inter * cfg.n_shared_experts,) * 2, GGUF_SHARED[module])
        return [Target(f"{L}.mlp.shared.gate_up.weight", rows=rows)]
    if module == "ffn_down_shexp":
        return [Target(f"{L}.mlp.shared.down.weight")]
    return llama.gguf_targets(name, cfg)             # norms, the dense layers' MLP

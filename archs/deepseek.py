"""DeepSeek-V2 / V2-Lite (`deepseek_v2`) and V3 / R1 (`deepseek_v3`): MLA (minillm/mla.py) + MoE
(minillm/moe.py). As transformers: YaRN's mscale_all_dim squared into the softmax scale, MoE in every
layer from first_k_dense_replace on (moe_layer_freq ignored; it is 1 in every published config).
The multi-token-prediction layer of V3/R1 (index num_hidden_layers) is ignored; their FP8 weights
are dequantised by the loader."""
import re

from minillm.config import Config
from minillm.rope import get_mscale

from . import IGNORE, Target, fused_rows, llama, rope_settings

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

"""One dataclass whose fields name every way the supported architectures differ.

Adapters (minillm.archs) translate a Hugging Face config.json into this; the decoder reads only
this. Adding an architecture means filling these fields, not subclassing the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field


# the hidden_act names the decoder implements (minillm.model.ACTS), as transformers spells them
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass
class Config:
    arch: str                       # adapter that produced it ("gpt2", "llama", "qwen3", ...)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int               # == num_heads: MHA; fewer: GQA (shared K/V per group)
    head_dim: int                   # independent of hidden_size / num_heads (Qwen3, Gemma)
    intermediate_size: int
    max_position: int               # context length

    # normalisation
    norm: str = "rms"               # "rms" (RMSNorm) | "layer" (LayerNorm with bias)
    norm_eps: float = 1e-6

    # positions
    pos: str = "rope"               # "rope" | "learned" (GPT-2's wpe)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3"|"yarn", ...} as in HF
    rope_interleaved: bool = False  # rotate pairs (2i, 2i+1) instead of halves (DeepSeek's stored layout)

    # MLP
    act: str = "silu"               # one of ACTIVATIONS
    gated_mlp: bool = True          # act(gate(x)) * up(x) (Llama) vs act(fc(x)) (GPT-2)

    # biases and extras
    qkv_bias: bool = False          # GPT-2, Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False           # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_embeddings: bool = False
    attn_scale: float | None = None  # softmax scale; None means 1/sqrt(head_dim)

    # Multi-head Latent Attention (DeepSeek-V2/V3); attention == "mla" selects it
    attention: str = "mha"          # "mha" (MHA/GQA/MQA) | "mla"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    # Mixture of experts (DeepSeek); layers listed in moe_layers use the MoE MLP
    moe_layers: list[int] = field(default_factory=list)
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    scoring_func: str = "softmax"   # "softmax" (V2) | "sigmoid" (V3)
    topk_method: str = "greedy"     # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    # token ids the checkpoint declares (generation stops at any eos)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None  # dtype the checkpoint was saved in ("bfloat16", ...)

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.act!r} (supported: {', '.join(ACTIVATIONS)})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim


BACKENDS = ("torch", "triton")
MLA_ABSORB = ("auto", "always", "never")


@dataclass(frozen=True)
class RunSettings:
    """How a model runs, as opposed to what it is (Config): decided once at load (loader.settings)
    and handed to the Decoder when it is built, so `Decoder(cfg, run)` says everything."""
    backend: str = "torch"         # "torch": SDPA and plain torch; "triton": minillm.kernels (GPU)
    cpu_plan: str = "blas"         # how CPU products run: a name in cpu.PLANS (layout + library)
    mla_absorb: str = "auto"       # MLA decode: "auto" absorbs W_UK/W_UV for one-token steps only;
                                   # "always" / "never" force one path (tests compare the two)
    quantize: str | None = None    # weight-only: "int8" | "int4:g32" | "int4:g64" | "int4:g128" (quant.py);
                                   # a GGUF file's own blocks (gguf.py): "as stored (Q4_1, Q8_0)", or
                                   # with a scheme asked "int4:g32 (Q4_1, Q8_0 as stored)"
    schemes: dict | None = field(default=None, repr=False, compare=False)
                                   # per module, beside `quantize` (gguf.py): core module name ->
                                   # quant.Scheme; a module absent takes the asked scheme, or none

    def __post_init__(self):
        from .cpu import PLANS
        from .quant import parse
        if self.schemes is None:
            scheme = parse(self.quantize)                       # UsageError on an unknown one
            object.__setattr__(self, "quantize", scheme.name if scheme else None)   # "int4" -> "int4:g32"
        for name, value, allowed in (("backend", self.backend, BACKENDS), ("cpu_plan", self.cpu_plan, PLANS),
                                     ("mla_absorb", self.mla_absorb, MLA_ABSORB)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r} (choose from {', '.join(allowed)})")

    @property
    def scheme(self):
        """The quant.Scheme asked for (--quantize), None when none was (a GGUF file's own blocks)."""
        from .quant import parse
        q = self.quantize
        return None if not q or q.startswith("as stored") else parse(q.split(" (")[0])

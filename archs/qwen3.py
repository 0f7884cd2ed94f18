"""Qwen3 (dense): the Llama layout plus RMSNorm on each head's q and k before RoPE (QK-norm), and
a head_dim set independently of hidden_size / heads (Qwen3-0.6B: 16 heads x 128 > 1024)."""
from minillm.config import Config

from . import llama

MODEL_TYPES = ("qwen3",)
ARCHITECTURES = ("Qwen3ForCausalLM",)


def to_config(hf: dict) -> Config:
    return llama.to_config(hf, arch="qwen3", qk_norm=True, qkv_bias=hf.get("attention_bias", False))


targets = llama.targets   # q_norm / k_norm are among llama's norm names
names = llama.names




# GGUF: llama's metadata and tensor names; the head_dim is attention.key_length, not a default
GGUF_ARCHS = ("qwen3",)
gguf_targets = llama.gguf_targets


def from_gguf(meta: dict, shapes: dict, read):
    hf = llama.gguf_config(meta, shapes)
    return llama.to_config(hf, arch="qwen3", qk_norm=True, **llama.gguf_biases(shapes)), hf

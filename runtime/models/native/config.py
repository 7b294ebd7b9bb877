"""What the native Llama-family model needs to know, read once from a checkpoint's config.

One dataclass covers Llama 2/3/3.1+, Mistral, Qwen2, Qwen3, Granite and SmolLM2: their differences are a handful of
flags (QKV bias, per-head q/k norms, Granite's multipliers, a sliding window) rather than separate classes. The
rotary frequency table comes from transformers' own rotary module for the model type, built once at load time, so
every rope scaling type transformers knows for these models is reproduced exactly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

ROTARY_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "granite": "Granite"}


@dataclass(frozen=True)
class NativeConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head's q and k before rotary
    embedding_multiplier: float = 1.0  # Granite
    residual_multiplier: float = 1.0  # Granite
    logits_scaling: float = 1.0  # Granite: logits are divided by it
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Granite: attention_multiplier)
    sliding_window: int | None = None  # Mistral: a key is seen by the next `sliding_window` queries (itself included)

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    @staticmethod
    def from_hf(hf) -> NativeConfig:
        """From a transformers config object of one of the native model types."""
        t = hf.model_type
        heads = hf.num_attention_heads
        bias = bool(getattr(hf, "attention_bias", False))
        granite = t == "granite"
        return NativeConfig(
            model_type=t, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=bias or t == "qwen2", o_bias=bias and t != "qwen2", mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=t == "qwen3",
            embedding_multiplier=float(hf.embedding_multiplier) if granite else 1.0,
            residual_multiplier=float(hf.residual_multiplier) if granite else 1.0,
            logits_scaling=float(hf.logits_scaling) if granite else 1.0,
            attention_scale=float(hf.attention_multiplier) if granite else None,
            sliding_window=getattr(hf, "sliding_window", None) if t == "mistral" else None,
        )


def rotary_tables(hf, max_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, head_dim] in float32, as transformers' rotary module computes them per position:
    (position · inv_freq) duplicated over both halves, times the rope type's attention scaling."""
    name = ROTARY_CLASSES[hf.model_type]
    module = importlib.import_module(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}")
    rotary = getattr(module, f"{name}RotaryEmbedding")(hf)
    inv_freq = rotary.inv_freq.to(torch.float32)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * rotary.attention_scaling).to(device), (emb.sin() * rotary.attention_scaling).to(device)

"""Native models: our own compact modules for the Llama family, read straight from safetensors.

`native_architecture` says whether a checkpoint's config is one these modules reproduce exactly (None) or why not
(the transformers runner then serves it).
"""

from __future__ import annotations

# model_type -> the transformers class the checkpoint must declare
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "granite": "GraniteForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # position-independent frequency tables


def native_architecture(config: dict) -> str | None:
    """None when the native modules serve this config exactly, else the reason they do not."""
    model_type = config.get("model_type")
    expected = ARCHITECTURES.get(model_type)
    if expected is None:
        return f"no native model for model_type {model_type!r} (native: {', '.join(sorted(ARCHITECTURES))})"
    if expected not in (config.get("architectures") or [expected]):
        return f"architecture {config.get('architectures')} is not {expected}"
    if config.get("quantization_config"):
        return "quantized checkpoints are served by transformers"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r} is not silu"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        return f"rope type {rope_type!r} depends on the sequence length"
    if config.get("use_sliding_window") or any(t != "full_attention" for t in config.get("layer_types") or ()):
        return "per-layer sliding-window attention"
    return None

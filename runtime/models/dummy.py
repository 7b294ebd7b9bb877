"""Model configs for `--load-format dummy`: benchmark a model's shape without its weights.

A spec is a local `config.json` (or a directory holding one) or a named shape from `NAMED_SHAPES` (the published
configs of models people benchmark). `write_dummy_model` turns a spec and a tokenizer into a model directory without
weights (config.json + tokenizer files), which every engine loads with `load_format="dummy"`: the native loader
fills its shapes with random weights, `runtime.models.loader.load_dummy_model` builds the transformers model.
"""

from __future__ import annotations

import json
from pathlib import Path

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Hugging Face config.json contents of the models' hub repositories (architecture fields only; token ids come from
# the tokenizer a dummy model is paired with)
NAMED_SHAPES: dict[str, dict] = {
    "llama-3-8b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE, "hidden_act": "silu", "tie_word_embeddings": True,
    },
    "qwen3-0.6b": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "hidden_act": "silu", "tie_word_embeddings": True,
    },
}


def dummy_config(spec: str) -> dict:
    """The config dict a spec names: a config.json file, a directory with one, or a key of NAMED_SHAPES."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a readable JSON model config: {exc}") from exc
        if not isinstance(config, dict) or "model_type" not in config:
            raise ValueError(f"{path} is not a model config (no model_type)")
        return config
    shape = NAMED_SHAPES.get(spec.lower())
    if shape is None:
        raise ValueError(f"{spec!r} is neither a config.json (or a directory with one) nor a named shape; "
                         f"named shapes: {', '.join(NAMED_SHAPES)}")
    return dict(shape)


def write_dummy_model(spec: str, tokenizer_dir: str | Path, out: Path) -> Path:
    """`out` as a weightless model directory: the spec's config with the tokenizer's special ids (they stop
    generation), and the tokenizer. Refuses a tokenizer whose ids would fall outside the embedding."""
    from transformers import AutoTokenizer

    config = dummy_config(spec)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > config.get("vocab_size", 0):
        raise ValueError(f"the tokenizer at {tokenizer_dir} has {len(tokenizer)} tokens, more than the vocab_size "
                         f"{config.get('vocab_size')} of {spec}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is not None:
            config[name] = getattr(tokenizer, name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    return out

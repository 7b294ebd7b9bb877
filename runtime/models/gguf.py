"""GGUF checkpoint → plain safetensors model directory (dequantized through transformers' GGUF support)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class GGUFConversionError(RuntimeError):
    pass


def _save_dequantized(gguf_path: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Write config, tokenizer (with chat template) and safetensors weights for `gguf_path` into `out_dir`.

    transformers refuses to `save_pretrained` a GGUF-loaded model ("quantized with gguf"), so the dequantized
    weights are copied into a plain model of the same architecture first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert into a new directory `out_dir` (written aside and renamed, so a half-written one is never used)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    _save_dequantized(Path(gguf_path), tmp, dtype)
    tmp.rename(out_dir)
    log.info("converted %s -> %s", gguf_path, out_dir)
    return out_dir


def convert_gguf_beside(gguf_path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert into the directory holding the GGUF file, refusing to overwrite existing weights."""
    gguf_path = Path(gguf_path)
    if any(gguf_path.parent.glob("*.safetensors")):
        raise GGUFConversionError("Existing .safetensors weights found, remove them first to reconvert")
    _save_dequantized(gguf_path, gguf_path.parent, dtype)
    return gguf_path.parent

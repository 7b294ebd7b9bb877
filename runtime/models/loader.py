"""Loading a Hugging Face model and tokenizer for serving: device, dtype, kind, sequence-length limit."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.parallel.sharding import read_manifest

log = logging.getLogger(__name__)

# config keys TGIS reads, in order, for the model's own max_sequence_length (spec §4.3)
SEQ_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "max_seq_length", "seq_len")
DEFAULT_MAX_SEQUENCE_LENGTH = 2048


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers fast tokenizer
    device: torch.device
    dtype: torch.dtype
    is_encoder_decoder: bool
    eos_token_id: int | None
    pad_token_id: int
    decoder_start_token_id: int | None
    vocab_size: int


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """float16/bfloat16 on GPU (bf16 where supported), float32 on CPU; an explicit name must be a torch dtype."""
    if dtype:
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"Unrecognized data type: {dtype}")
        return value
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_max_sequence_length(model_path: str | Path) -> int | None:
    """The first integer among TGIS' config keys, or None."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    for key in SEQ_LEN_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _first(value) -> int | None:
    return value[0] if isinstance(value, list | tuple) else value


def load_model(model_path: str | Path, dtype: str | None = None, device: str | None = None,
               trust_remote_code: bool = False, shard: tuple[int, int] | None = None,
               split: str = "rules") -> LoadedModel:
    """Load model and tokenizer; `shard=(rank, world_size)` keeps only that tensor-parallel rank's slices (cut on
    the CPU before moving to the device, so a GPU never holds the whole model), split by our own rules or, with
    `split="deepspeed"`, by DeepSpeed AutoTP."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    manifest = read_manifest(model_path)
    if manifest is not None and (shard is None or shard[1] != manifest["world_size"]):
        raise ValueError(f"{model_path} was split for {manifest['world_size']} ranks by `tgis shard`: serve it with "
                         f"--num-gpus {manifest['world_size']}")
    if manifest is not None:
        from accelerate import init_empty_weights

        from runtime.parallel.layers import load_presplit

        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, dtype=dt, trust_remote_code=trust_remote_code).eval()
        model.tie_weights()  # from_config leaves tied heads as separate parameters
        vocab = model.get_output_embeddings().weight.shape[0]
        load_presplit(model, Path(model_path) / f"rank-{shard[0]}", *shard, dt)
    else:
        model = cls.from_pretrained(model_path, dtype=dt, trust_remote_code=trust_remote_code).eval()
        vocab = model.get_output_embeddings().weight.shape[0]
        if shard is not None and split == "deepspeed":
            from runtime.parallel.deepspeed import autotp

            model = autotp(model, dt, dev)
        elif shard is not None:
            from runtime.parallel.layers import shard_model

            shard_model(model, *shard)
    model.to(dev)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    log.info("loaded %s (%s) on %s as %s", model_path, type(model).__name__, dev, dt)
    return LoadedModel(model, tokenizer, dev, dt, seq2seq, *special_ids(config, tokenizer), vocab)


def load_dummy_model(model_path: str | Path, dtype: str | None = None, device: str | None = None,
                     seed: int = 0) -> LoadedModel:
    """The transformers model of a weightless model directory (runtime.models.dummy.write_dummy_model) with seeded
    random weights, built directly on the device: benchmarks of shapes whose weights are not here."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = AutoConfig.from_pretrained(model_path)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    torch.manual_seed(seed)
    with dev:  # tied embeddings stay tied (unlike under accelerate's init_empty_weights)
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(config, dtype=dt).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    log.info("built %s (%s) with random weights on %s as %s", model_path, type(model).__name__, dev, dt)
    vocab = model.get_output_embeddings().weight.shape[0]
    return LoadedModel(model, tokenizer, dev, dt, seq2seq, *special_ids(config, tokenizer), vocab)


def special_ids(config, tokenizer) -> tuple[int | None, int, int | None]:
    """(EOS, pad, decoder start) as TGIS picks them: EOS from the config, else the tokenizer's (TGIS #93); pad from
    the config, the tokenizer, EOS or 0; the decoder start (encoder-decoder models) from the config, BOS or pad."""
    eos = _first(config.eos_token_id)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = _first(config.pad_token_id)
    for candidate in (tokenizer.pad_token_id, eos, 0):
        if pad is None:
            pad = candidate
    start = getattr(config, "decoder_start_token_id", None)
    if getattr(config, "is_encoder_decoder", False) and start is None:
        start = config.bos_token_id if config.bos_token_id is not None else pad
    return eos, pad, start

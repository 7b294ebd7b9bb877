"""Loading a native model: safetensors straight into fused QKV and gate-up weights, sliced per tensor-parallel rank.

Checkpoint tensors keep transformers' names; each goes to its native parameter (and fused part), sliced by the
rules of runtime/parallel/rules.py when sharded, so the native path and the transformers path split a model the
same way. A `tgis shard` directory is already sliced: each rank reads its own file as it is. `load_format="dummy"`
fills the same shapes with random weights on the device (benchmarks of shapes whose weights are not here).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from runtime.engine.config import EngineConfig
from runtime.models.loader import LoadedModel, resolve_device, resolve_dtype, special_ids
from runtime.models.native.config import NativeConfig, rotary_tables
from runtime.models.native.layers import Projection
from runtime.models.native.llama import NativeCausalLM, TPShape
from runtime.parallel.layers import VocabParallelEmbedding, VocabParallelLMHead, take
from runtime.parallel.rules import plan, rule_for
from runtime.parallel.sharding import read_manifest

log = logging.getLogger(__name__)

# checkpoint module -> (native parameter path with {i} for the layer, fused part)
LAYER_TENSORS = {
    "input_layernorm": ("input_norm", None), "post_attention_layernorm": ("post_attention_norm", None),
    "self_attn.q_proj": ("attn.qkv", 0), "self_attn.k_proj": ("attn.qkv", 1), "self_attn.v_proj": ("attn.qkv", 2),
    "self_attn.o_proj": ("attn.o", None), "self_attn.q_norm": ("attn.q_norm", None),
    "self_attn.k_norm": ("attn.k_norm", None), "mlp.gate_proj": ("mlp.gate_up", 0), "mlp.up_proj": ("mlp.gate_up", 1),
    "mlp.down_proj": ("mlp.down", None),
}


def native_target(name: str) -> tuple[str, int | None] | None:
    """`model.layers.3.self_attn.k_proj.weight` -> ("layers.3.attn.qkv.weight", 1); None for tensors the native
    model does not use (rotary caches some checkpoints carry)."""
    parts = name.split(".")
    kind = parts[-1]
    if name.startswith("model.layers."):
        module = ".".join(parts[3:-1])
        target = LAYER_TENSORS.get(module)
        return None if target is None else (f"layers.{parts[2]}.{target[0]}.{kind}", target[1])
    return {"model.embed_tokens.weight": ("embed_tokens.weight", None), "model.norm.weight": ("norm.weight", None),
            "lm_head.weight": ("lm_head.weight", None)}.get(name)


def _checkpoint_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {model_dir}: the native engine reads safetensors only "
                         "(`tgis convert-to-safetensors`, or --engine transformers)")
    return files


def load_native(config: EngineConfig, shard: tuple[int, int] | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    path = Path(config.model_path)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    hf = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    cfg = NativeConfig.from_hf(hf)
    raw = json.loads((path / "config.json").read_text())
    manifest = read_manifest(path)
    if manifest is not None and (shard is None or shard[1] != manifest["world_size"]):
        raise ValueError(f"{path} was split for {manifest['world_size']} ranks by `tgis shard`: serve it with "
                         f"--num-gpus {manifest['world_size']}")
    rank, world = shard or (0, 1)
    split = plan(raw, world, cfg.vocab_size) if world > 1 else None
    shape = TPShape(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) if split is None else TPShape(
        split.q_heads[rank], split.kv_heads[rank], split.sizes("mlp")[rank], parallel=True)
    vocab_rows = cfg.vocab_size if split is None else split.sizes("vocab")[rank]
    rope = torch.stack(rotary_tables(hf, config.max_sequence_length or cfg.max_position_embeddings, device), 1)
    with torch.device("meta"):  # parameters get memory once, on the device, in the serving dtype
        model = NativeCausalLM(cfg, shape, rope)
        model.embed_tokens = nn.Embedding(vocab_rows, cfg.hidden_size, _freeze=True)
        model.lm_head = Projection(cfg.hidden_size, [vocab_rows], bias=False)
    model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives shared parameters separate storage
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = rope.to(dtype)  # cast once, as transformers casts them per step
    if config.load_format == "dummy":
        _random_weights(model)
    else:
        files = [path / f"rank-{rank}" / "model.safetensors"] if manifest else _checkpoint_files(path)
        _read_weights(model, files, raw, rank, split if manifest is None else None)
    if split is not None:
        [(start, _)] = split.ranges["vocab"][rank]
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight.data, start)
        model.lm_head = VocabParallelLMHead(model.lm_head.weight, None, split.sizes("vocab"))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    log.info("loaded %s natively (%s, %d layers) on %s as %s%s", path, cfg.model_type, cfg.num_layers, device, dtype,
             f", rank {rank} of {world}" if split is not None else "")
    return LoadedModel(model, tokenizer, device, dtype, False, *special_ids(hf, tokenizer)[:2], None, cfg.vocab_size)


def _read_weights(model: NativeCausalLM, files: list[Path], raw_config: dict, rank: int, split) -> None:
    """Copy every checkpoint tensor into its (fused) parameter, slicing this rank's part when `split` is given."""
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    tied = model.config.tie_word_embeddings
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                target = native_target(name)
                if target is None or (tied and target[0] == "lm_head.weight"):
                    continue
                tensor = f.get_tensor(name)
                if split is not None:
                    rule = rule_for(raw_config, name)
                    if rule.dim is not None:
                        tensor = take(tensor, rule.dim, split.ranges[rule.unit][rank])
                _assign(model, target[0], params[target[0]], target[1], tensor, name)
                filled.add(f"{target[0]}#{target[1]}")
    expected = {f"{n}#{p}" for n, p in _expected_slots(model)}
    missing = sorted(expected - filled)
    if missing:
        raise ValueError(f"the checkpoint lacks {', '.join(m.split('#')[0] for m in missing[:5])}")


def _projection_parts(model: NativeCausalLM, param_name: str) -> list[int] | None:
    module = model.get_submodule(param_name.rsplit(".", 1)[0])
    return getattr(module, "lora_parts", None)


def _assign(model: NativeCausalLM, param_name: str, param: torch.Tensor, part: int | None, tensor: torch.Tensor,
            name: str) -> None:
    target = param.data
    if part is not None:
        parts = _projection_parts(model, param_name)
        start = sum(parts[:part])
        target = target[start:start + parts[part]]
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
    target.copy_(tensor)


def _expected_slots(model: NativeCausalLM) -> list[tuple[str, int | None]]:
    """Every (parameter, fused part) a checkpoint must fill."""
    out = []
    for name, _ in model.named_parameters(remove_duplicate=True):
        parts = _projection_parts(model, name) if name.endswith((".weight", ".bias")) else None
        out += [(name, p) for p in range(len(parts))] if parts and len(parts) > 1 else [(name, None)]
    return out


def _random_weights(model: NativeCausalLM) -> None:
    """Normal(0, 0.02) matrices, unit norms, zero biases: activations stay in range over many layers."""
    gen = torch.Generator(device=model.rope.device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02, generator=gen)

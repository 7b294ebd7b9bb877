"""`tgis shard`: write one safetensors directory per tensor-parallel rank, following `runtime.parallel.rules`,
and verify that the rank files reassemble bit-exactly. Pre-split checkpoints require even splits (every rank's
files the same shape); the runtime's in-memory slicing also handles uneven head groups.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from runtime.parallel.rules import PRESPLIT, ShardingError, dims, family, rule_for

__all__ = ["ShardingError", "check_divisible", "read_manifest", "reassemble", "shard_checkpoint", "verify"]
META_SKIP = (".safetensors", ".bin", ".gguf", ".index.json", ".pt", ".pth")


def check_divisible(config: dict, world_size: int) -> None:
    if family(config) not in PRESPLIT:
        raise ShardingError(f"tgis shard writes contiguous splits only ({', '.join(PRESPLIT)} families), not "
                            f"{config.get('model_type')!r}: serve it with --num-gpus N from the original checkpoint")
    d = dims(config)
    checks = {"num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "intermediate_size": d.intermediate,
              "vocab_size": config["vocab_size"]}
    for key, value in checks.items():
        if value % world_size:
            raise ShardingError(f"{key} ({value}) is not divisible by --num-shards {world_size}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ShardingError(f"no .safetensors weights in {model_dir} (convert them with `tgis convert-to-safetensors`)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def shard_checkpoint(model_dir: Path, world_size: int, out_dir: Path) -> dict:
    """Write `out_dir/rank-<r>/` (config, tokenizer, model.safetensors) and `out_dir/manifest.json`; verify."""
    config = json.loads((model_dir / "config.json").read_text())
    check_divisible(config, world_size)
    if out_dir.exists() and any(out_dir.iterdir()):  # stale rank dirs of another world size would mislead a loader
        raise ShardingError(f"{out_dir} is not empty: remove it first or choose another --output")
    tensors = _load_all(model_dir)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # each rank needs its own vocab slice
    rules = {name: rule_for(config, name) for name in tensors}
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):
        rank_dir = out_dir / f"rank-{rank}"
        rank_dir.mkdir(exist_ok=True)
        part = {name: (t if rules[name].dim is None else t.chunk(world_size, rules[name].dim)[rank]).contiguous()
                for name, t in tensors.items()}
        save_file(part, rank_dir / "model.safetensors", metadata={"format": "pt", "rank": str(rank),
                                                                    "world_size": str(world_size)})
        _copy_meta(model_dir, rank_dir)
    _copy_meta(model_dir, out_dir)  # config + tokenizer at the top too: the directory resolves like any model
    manifest = {
        "world_size": world_size,
        "model_type": config["model_type"],
        "source": str(model_dir),
        "source_files": {f.name: _sha256(f) for f in sorted(model_dir.glob("*.safetensors"))},
        "rules": {name: {"split": rule.split, "dim": rule.dim} for name, rule in sorted(rules.items())},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    verify(out_dir, tensors)
    return manifest


def _copy_meta(src: Path, dst: Path) -> None:
    for meta in src.iterdir():
        if meta.is_file() and not meta.name.endswith(META_SKIP):
            shutil.copy(meta, dst / meta.name)


def read_manifest(model_dir: str | Path) -> dict | None:
    """The `tgis shard` manifest when `model_dir` is a pre-split checkpoint, else None."""
    path = Path(model_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def reassemble(out_dir: Path) -> dict[str, torch.Tensor]:
    """Concatenate the rank files back into full tensors, following the manifest."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    parts = [load_file(out_dir / f"rank-{r}" / "model.safetensors") for r in range(manifest["world_size"])]
    full = {}
    for name, rule in manifest["rules"].items():
        dim = rule["dim"]
        full[name] = parts[0][name] if dim is None else torch.cat([p[name] for p in parts], dim=dim)
    return full


def verify(out_dir: Path, original: dict[str, torch.Tensor]) -> None:
    rebuilt = reassemble(out_dir)
    for name, tensor in original.items():
        if not torch.equal(rebuilt[name], tensor):
            raise ShardingError(f"shards of {name} do not reassemble to the original tensor")

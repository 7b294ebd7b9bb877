"""PyTorch `.bin` checkpoints → safetensors, as TGIS' `convert-to-safetensors` does it (spec §5.1).

safetensors cannot store two names for one storage, so aliases of shared (tied) tensors are dropped, keeping the
name that covers the whole storage and that the architecture does not list as tied/ignorable; the dropped names
are recorded in the file's metadata. Every written file is reloaded and compared tensor by tensor.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SKIP_CONVERT = ("arguments", "args", "training", "optimizer", "scheduler", "index")


class ConversionError(RuntimeError):
    pass


def target_name(bin_name: str) -> str:
    """`pytorch_model-00001-of-00002.bin` → `model-00001-of-00002.safetensors`."""
    stem = bin_name.removesuffix(".bin")
    return stem.removeprefix("pytorch_") + ".safetensors"


def discard_names(model_dir: Path) -> set[str]:
    """Names the architecture class declares tied or ignorable: preferred for dropping."""
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").exists() else {}
    names: set[str] = set()
    for arch in config.get("architectures") or []:
        import transformers

        cls = getattr(transformers, arch, None)
        for attr in ("_tied_weights_keys", "_keys_to_ignore_on_load_missing"):
            value = getattr(cls, attr, None) or []
            names.update(value.keys() if isinstance(value, dict) else value)
    return names


def _dedupe(state: dict[str, torch.Tensor], discard: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop aliases of shared storages; returns (tensors to save, {removed: kept})."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, t in state.items():
        groups[(t.device, t.untyped_storage().data_ptr())].append(name)
    removed: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        covering = [n for n in sorted(names) if state[n].data_ptr() == state[n].untyped_storage().data_ptr()
                    and state[n].nelement() * state[n].element_size() == state[n].untyped_storage().nbytes()]
        if not covering:
            raise ConversionError("Error while trying to find names to remove to save state dict, but found no "
                                  f"suitable name to keep for saving amongst: {sorted(names)}")
        keep = next((n for n in covering if n not in discard), covering[0])
        removed.update({n: keep for n in names if n != keep})
    kept = {n: t.contiguous() for n, t in state.items() if n not in removed}
    return kept, removed


def convert_file(src: Path, dst: Path, discard: set[str]) -> dict[str, str]:
    """Convert one `.bin`; returns the removed aliases."""
    loaded = torch.load(src, map_location="cpu", weights_only=True)
    state = loaded.get("state_dict", loaded)
    tensors, removed = _dedupe(state, discard)
    save_file(tensors, dst, metadata={"format": "pt", **removed})
    reloaded = load_file(dst)
    for key, value in tensors.items():
        if not torch.equal(value, reloaded[key]):
            raise ConversionError(f"The output tensors do not match for key {key}")
    return removed


def convert_bin_dir(model_dir: Path, log=print) -> list[Path]:
    """Convert every `.bin` of a model directory (sharded or not) and rewrite the shard index."""
    indexes = sorted(model_dir.glob("*.bin.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"Found more than one .bin.index.json file: {[p.name for p in indexes]}")
    bins = sorted(p for p in model_dir.glob("*.bin") if not any(s in p.name for s in SKIP_CONVERT))
    if not bins:
        raise ConversionError("No pytorch .bin files found to convert")
    targets = [model_dir / target_name(p.name) for p in bins]
    if any(t.exists() for t in targets):
        raise ConversionError("Existing .safetensors weights found, remove them first to reconvert")
    new_index = None
    if indexes:
        new_index = model_dir / (indexes[0].name.removesuffix(".bin.index.json").removeprefix("pytorch_")
                                 + ".safetensors.index.json")
        if new_index.exists():
            raise ConversionError(f"Existing {new_index.name} file found, remove it first to reconvert")
    discard = discard_names(model_dir)
    for src, dst in zip(bins, targets, strict=True):
        log(f"converting {src.name} -> {dst.name}")
        convert_file(src, dst, discard)
    if new_index is not None:
        index = json.loads(indexes[0].read_text())
        index["weight_map"] = {k: target_name(v) for k, v in index["weight_map"].items()}
        new_index.write_text(json.dumps(index, indent=2))
    return targets

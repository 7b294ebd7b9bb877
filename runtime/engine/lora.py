"""Per-request LoRA adapters (`adapter_id`, PEFT format) applied to a shared base model inside one batch.

Each target linear layer gets one forward hook that adds, for every adapter active in the current forward, its
low-rank update to that adapter's rows only: `out[rows] += scale * (x[rows] @ A^T) @ B^T`. Base weights are never
modified, so requests with different adapters (or none) share a batch, and a request's tokens do not depend on
who it shares the batch with. Adapters load on first use from their directory and stay cached (LRU by count).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runtime.echo import echo

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraRef:
    """What a request carries: the adapter's name and directory (the weights load in the engine)."""

    name: str
    path: str


@contextlib.contextmanager
def adapter_errors(ref: LoraRef):
    """Any failure reading `ref` becomes a ValueError that names it: an unreadable file is the adapter's problem,
    said plainly to its request's client (ValueErrors pass as they are)."""
    try:
        yield
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"can't load adapter '{ref.name}': {exc}") from exc


@dataclass
class _Adapter:
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])


def _json_object(path: Path) -> dict:
    """A JSON object file; ValueError in words a client can act on (never a path or a Python class name)."""
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path.name} cannot be read ({exc.strerror or type(exc).__name__})") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path.name} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} must hold a JSON object, not a {type(value).__name__}")
    return value


def _positive(value, integer: bool = False) -> bool:
    kinds = int if integer else int | float
    return isinstance(value, kinds) and not isinstance(value, bool) and value > 0


def read_lora_config(folder: Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter; ValueError for what this engine cannot apply (checked here, so
    the engine never meets a config it would fail on)."""
    config = _json_object(folder / "adapter_config.json")
    if config.get("fan_in_fan_out"):
        raise ValueError("LoRA adapters with fan_in_fan_out are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError("LoRA adapters with trained biases are not supported")
    if not _positive(config.get("r"), integer=True):
        raise ValueError("adapter_config.json needs a positive integer r (the LoRA rank)")
    if not _positive(config.get("lora_alpha", config["r"])):
        raise ValueError("adapter_config.json: lora_alpha must be a positive number")
    return config


@contextlib.contextmanager
def _loading(name: str):
    """Client messages for an adapter that cannot be used name it (cut to a bounded length)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"can't load adapter '{echo(name)}': {exc}") from exc


def find_lora(folder: Path, name: str) -> LoraRef | None:
    """The PEFT LoRA adapter stored in `folder`; None when the folder holds something else (a prompt prefix:
    PEFT prompt tuning or decoder.pt/encoder.pt); ValueError, with the message for the client, for adapters of
    another type or that this engine cannot apply."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return None
    with _loading(name):
        kind = _json_object(config_path).get("peft_type")
    if kind == "PROMPT_TUNING":
        return None
    if kind != "LORA":
        raise ValueError(f"adapter type {echo(str(kind))} is not currently supported")
    with _loading(name):
        read_lora_config(folder)
        if not (folder / "adapter_model.safetensors").is_file():
            raise ValueError("adapter_model.safetensors not found")
    return LoraRef(name, str(folder))


class LoraManager:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, max_adapters: int = 8):
        self.modules = dict(model.named_modules())
        self.device, self.dtype, self.max_adapters = device, dtype, max_adapters
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()
        self._hooked: set[str] = set()
        self._groups: list[tuple[_Adapter, torch.Tensor]] = []

    def activate(self, rows: list[LoraRef | None]) -> None:
        """Set which rows of the next forward use which adapter (loading adapters on first use)."""
        by_name: dict[str, tuple[_Adapter, list[int]]] = {}
        for i, ref in enumerate(rows):
            if ref is not None:
                if ref.name not in by_name:
                    by_name[ref.name] = (self._load(ref), [])  # held here even if evicted from the cache
                by_name[ref.name][1].append(i)
        self._groups = [(adapter, torch.tensor(idx, device=self.device)) for adapter, idx in by_name.values()]

    def _load(self, ref: LoraRef) -> _Adapter:
        if ref.name in self._adapters:
            self._adapters.move_to_end(ref.name)
            return self._adapters[ref.name]
        from safetensors.torch import load_file

        folder = Path(ref.path)
        config = read_lora_config(folder)
        r, alpha = config["r"], config.get("lora_alpha", config["r"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        raw = load_file(folder / "adapter_model.safetensors")
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, a in raw.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
            b = raw[key.replace(".lora_A.", ".lora_B.")]
            target = self.modules.get(module)
            if not isinstance(target, nn.Linear):
                raise ValueError(f"LoRA adapter {ref.name}: {module} is not a linear layer of this model")
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
                raise ValueError(f"LoRA adapter {ref.name}: {module} shapes {tuple(a.shape)}, {tuple(b.shape)} do "
                                 f"not fit ({target.in_features} -> {target.out_features})")
            weights[module] = (a.to(self.device, self.dtype), b.to(self.device, self.dtype))
        for module in weights.keys() - self._hooked:
            self.modules[module].register_forward_hook(self._hook(module))
            self._hooked.add(module)
        if len(self._adapters) >= self.max_adapters:
            self._adapters.popitem(last=False)
        adapter = self._adapters[ref.name] = _Adapter(scale, weights)
        return adapter

    def _hook(self, module: str):
        def add_updates(_mod: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
            for adapter, rows in self._groups:
                ab = adapter.weights.get(module)
                if ab is not None:
                    x = args[0][rows]
                    out[rows] += adapter.scale * ((x @ ab[0].T) @ ab[1].T)
            return out

        return add_updates

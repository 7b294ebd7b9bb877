"""Per-request LoRA adapters on the native model: every loaded adapter's low-rank update stacked per projection.

A projection's stack holds, for each adapter slot and each fused part (q/k/v of the QKV projection, gate/up), the
PEFT matrices A [r, in] and scale·B [out_part, r]. One forward then applies each token's own adapter with two
matmuls: h = x Aᵀ over all slots and parts, zero the columns of other slots (a per-token mask), y += h Bᵀ. Shapes do
not depend on which adapters are active, base rows multiply by zeros, and base weights are never modified, so
adapters and the base model share a batch. Adapters load on first use and are evicted least recently used, never
while a running sequence uses them (the scheduler admits at most `max_loras` distinct adapters at once).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch

from runtime.engine.lora import PEFT_PREFIX, LoraRef, adapter_errors, read_lora_config

# PEFT target module -> (native projection, fused part)
TARGETS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
           "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}


class LoraSlots:
    """The adapter slot of every token of the coming forward ([T] long, -1 for the base model), or None when no
    token uses one; set by the runner before each forward, read by every stacked projection."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.active: torch.Tensor | None = None


class StackedLora:
    def __init__(self, in_features: int, parts: list[int], num_slots: int, device, dtype):
        self.parts, self.num_slots = parts, num_slots
        self.offsets = [sum(parts[:i]) for i in range(len(parts))]
        self.in_features, self.device, self.dtype = in_features, device, dtype
        self.rank = 0
        self.a = torch.zeros(0, in_features, device=device, dtype=dtype)
        self.b = torch.zeros(sum(parts), 0, device=device, dtype=dtype)
        self.column_slot = torch.zeros(0, dtype=torch.long, device=device)

    def _columns(self, slot: int, part: int) -> slice:
        start = (slot * len(self.parts) + part) * self.rank
        return slice(start, start + self.rank)

    def _grow(self, rank: int) -> None:
        """Re-stack with a larger rank (zero-padded: padding columns contribute exactly nothing)."""
        old_a, old_b, old_rank = self.a, self.b, self.rank
        self.rank = rank
        columns = self.num_slots * len(self.parts) * rank
        self.a = torch.zeros(columns, self.in_features, device=self.device, dtype=self.dtype)
        self.b = torch.zeros(sum(self.parts), columns, device=self.device, dtype=self.dtype)
        for group in range(self.num_slots * len(self.parts)):
            self.a[group * rank:group * rank + old_rank] = old_a[group * old_rank:(group + 1) * old_rank]
            self.b[:, group * rank:group * rank + old_rank] = old_b[:, group * old_rank:(group + 1) * old_rank]
        self.column_slot = torch.arange(columns, device=self.device) // (len(self.parts) * rank)

    def set(self, slot: int, part: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Slot `slot`'s update of fused part `part` (None: this adapter does not target it)."""
        if a is not None and a.shape[0] > self.rank:
            self._grow(a.shape[0])
        cols = self._columns(slot, part)
        rows = slice(self.offsets[part], self.offsets[part] + self.parts[part])
        self.a[cols] = 0
        self.b[rows, cols] = 0
        if a is not None:
            r = a.shape[0]
            self.a[cols.start:cols.start + r] = a.to(self.device, self.dtype)
            self.b[rows, cols.start:cols.start + r] = (b * scale).to(self.device, self.dtype)

    def delta(self, x: torch.Tensor, slots: LoraSlots) -> torch.Tensor:
        mask = (self.column_slot[None, :] == slots.active[:, None]).to(x.dtype)
        return ((x @ self.a.T) * mask) @ self.b.T


class NativeLoraManager:
    """Adapter name -> slot; loads PEFT weights into the stacks of the projections they target."""

    def __init__(self, projections: list[dict], num_slots: int, device, dtype):
        self.projections = projections  # per layer: {"qkv": Projection, "o": ..., "gate_up": ..., "down": ...}
        self.slots = LoraSlots(num_slots)
        self.device, self.dtype = device, dtype
        self.loaded: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recently used first
        self.parsed: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # checked weights, on the CPU
        for layer in projections:
            for projection in layer.values():
                projection.slots = self.slots

    def check(self, ref: LoraRef) -> None:
        """Read and check `ref`'s weights now (admission), so that a broken adapter fails its own request only."""
        self._parsed(ref)

    def _parsed(self, ref: LoraRef) -> tuple[float, dict]:
        if ref.name not in self.parsed:
            with adapter_errors(ref):
                self.parsed[ref.name] = self._parse(ref)
            while len(self.parsed) > 2 * self.slots.num_slots:
                self.parsed.popitem(last=False)
        self.parsed.move_to_end(ref.name)
        return self.parsed[ref.name]

    def slot_for(self, ref: LoraRef, in_use: set[int]) -> int:
        """The slot holding `ref`, loading it (over the least recently used slot not `in_use`) if needed."""
        if ref.name in self.loaded:
            self.loaded.move_to_end(ref.name)
            return self.loaded[ref.name]
        taken = set(self.loaded.values())
        free = [s for s in range(self.slots.num_slots) if s not in taken]
        if not free:
            victim = next((name for name, s in self.loaded.items() if s not in in_use), None)
            if victim is None:
                raise RuntimeError(f"all {self.slots.num_slots} LoRA slots are in use")
            free = [self.loaded.pop(victim)]
        slot = free[0]
        self._load(ref, slot)
        self.loaded[ref.name] = slot
        return slot

    def _load(self, ref: LoraRef, slot: int) -> None:
        scale, updates = self._parsed(ref)
        for layer, names in enumerate(self.projections):
            for name, projection in names.items():
                if projection.lora is None:
                    if not any(k[:2] == (layer, name) for k in updates):
                        continue
                    projection.lora = StackedLora(projection.weight.shape[1], projection.lora_parts,
                                                  self.slots.num_slots, self.device, self.dtype)
                for part in range(len(projection.lora_parts)):
                    a, b = updates.get((layer, name, part), (None, None))
                    projection.lora.set(slot, part, a, b, scale)

    def _parse(self, ref: LoraRef) -> tuple[float, dict]:
        """(scale, {(layer, projection, part): (A, B)}) of a PEFT adapter, its shapes checked against the model."""
        from safetensors.torch import load_file

        folder = Path(ref.path)
        config = read_lora_config(folder)
        r, alpha = config["r"], config.get("lora_alpha", config["r"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        raw = load_file(folder / "adapter_model.safetensors")
        updates: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for key, a in raw.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]  # model.layers.3.self_attn.q_proj
            parts = module.split(".")
            target = TARGETS.get(parts[-1])
            if target is None or len(parts) < 4 or parts[-4] != "layers" or not parts[-3].isdigit():
                raise ValueError(f"LoRA adapter {ref.name}: {module} is not a projection the native model has")
            b = raw.get(key.replace(".lora_A.", ".lora_B."))
            layer = int(parts[-3])
            if b is None or layer >= len(self.projections):
                raise ValueError(f"LoRA adapter {ref.name}: {module} has no lora_B or no such layer in the model")
            projection = self.projections[layer][target[0]]
            size = projection.lora_parts[target[1]]
            if a.shape[1] != projection.weight.shape[1] or b.shape[0] != size:
                raise ValueError(f"LoRA adapter {ref.name}: {module} shapes {tuple(a.shape)}, {tuple(b.shape)} do "
                                 f"not fit ({projection.weight.shape[1]} -> {size})")
            updates[(layer, target[0], target[1])] = (a, b)
        return scale, updates

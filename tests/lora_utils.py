"""Build PEFT LoRA adapters for tests and GPU checks, and the merged-weights reference model."""

from __future__ import annotations

import copy
import json

import torch
from safetensors.torch import save_file

R, ALPHA = 4, 8


def write_lora(folder, model, targets: list[str], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT LoRA adapter for every module whose name ends with one of `targets`; returns {module: (A, B)}."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    weights, tensors = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            a = torch.randn(R, module.in_features) * 0.3
            b = torch.randn(module.out_features, R) * 0.3
            weights[name] = (a, b)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False}))
    return weights


def merged_copy(model, weights):
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, (a, b) in weights.items():
            modules[name].weight += (ALPHA / R) * b @ a
    return merged

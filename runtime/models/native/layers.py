"""Building blocks of the native model, each computing exactly what its transformers counterpart computes.

Projections are plain weight matrices (fused where the checkpoint has separate ones: QKV, gate+up) with an optional
stacked LoRA delta and, under tensor parallelism, an all-reduce after row-parallel ones. Nothing here looks modules
up by name at run time, so fused projections, CUDA graphs and torch.compile all see plain tensor code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from runtime.models.native.lora import LoraSlots, StackedLora


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Projection(nn.Module):
    """y = x Wᵀ (+ b) (+ this token's LoRA delta); `reduce`: the output is a partial sum over tensor-parallel ranks
    (row-parallel), completed by an all-reduce after the bias-free matmul and LoRA, then the bias once.
    `matvec`: a kernel for one-row inputs (batch-1 decode) with F.linear's signature, set by the runner where it
    has one (runtime/models/native/triton_gemv.py)."""

    def __init__(self, in_features: int, parts: list[int], bias: bool, reduce: bool = False):
        """`parts`: output sizes of the fused projections (e.g. [q, k, v]), in order."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(sum(parts), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(sum(parts)), requires_grad=False) if bias else None
        self.reduce = reduce
        self.lora_parts = parts
        self.lora: StackedLora | None = None  # set when an adapter targets this projection
        self.slots: LoraSlots | None = None
        self.matvec: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            return self._with_lora(x, self._linear(x, self.bias))
        y = self._with_lora(x, self._linear(x, None))
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.matvec is not None and x.shape[0] == 1:
            return self.matvec(x, self.weight, bias)
        return F.linear(x, self.weight, bias)

    def _with_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.lora is not None and self.slots is not None and self.slots.active is not None:
            y = y + self.lora.delta(x, self.slots)
        return y


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, KVH, D], cos/sin [T, D] (already in the activations' dtype), as transformers does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

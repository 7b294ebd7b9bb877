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

from runtime.models.native import cpu_kernels, onednn
from runtime.models.native.lora import LoraSlots, StackedLora


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and (y := cpu_kernels.rms_norm(x, self.weight, self.eps)) is not None:
            return y
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Projection(nn.Module):
    """y = x Wᵀ (+ b) (+ this token's LoRA delta); `reduce`: the output is a partial sum over tensor-parallel ranks
    (row-parallel), completed by an all-reduce after the bias-free matmul and LoRA, then the bias once. `activate`:
    the output is [gate | up] and the projection returns silu(gate) · up (a gated MLP's gate-up projection).
    `matvec`: a kernel for one-row inputs (batch-1 decode) that also computes the input (`norm`), activates
    (`activate`) and adds the residual, set
    by the runner where it has one (runtime/models/native/triton_gemv.py): at batch 1 the small kernels between
    the products cost as much as the products' own inefficiency. On the CPU the weight may be packed for oneDNN
    (runtime/models/native/onednn.py)."""

    def __init__(self, in_features: int, parts: list[int], bias: bool, reduce: bool = False, activate: bool = False):
        """`parts`: output sizes of the fused projections (e.g. [q, k, v]), in order."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(sum(parts), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(sum(parts)), requires_grad=False) if bias else None
        self.reduce, self.activate = reduce, activate
        self.lora_parts = parts
        self.lora: StackedLora | None = None  # set when an adapter targets this projection
        self.slots: LoraSlots | None = None
        self.matvec: Callable[..., torch.Tensor] | None = None
        self.packed = False  # the weight is oneDNN-packed (runtime/models/native/onednn.py)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None, residual: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        """`norm`: applied to x first; returns residual + scale · y when `residual` is given."""
        bias = None if self.reduce else self.bias
        if self.matvec is not None and x.shape[0] == 1 and not self._lora_active():
            fused = None if self.reduce else residual  # a partial sum is completed before the residual joins
            y = self.matvec(x, self.weight, bias, None if norm is None else norm.weight,
                            0.0 if norm is None else norm.eps, self.activate, fused, scale)
            if fused is not None:
                return y
        else:
            x = x if norm is None else norm(x)
            y = onednn.linear(x, self.weight, bias) if self.packed else F.linear(x, self.weight, bias)
            if self._lora_active():
                y = y + self.lora.delta(x, self.slots)
            if self.activate:
                gate, up = y.chunk(2, dim=-1)
                y = F.silu(gate) * up
        if self.reduce:
            dist.all_reduce(y)
            y = y if self.bias is None else y + self.bias
        if residual is None:
            return y
        return residual + (y if scale == 1.0 else y * scale)

    def _lora_active(self) -> bool:
        return self.lora is not None and self.slots is not None and self.slots.active is not None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, KVH, D], cos/sin [T, D] (already in the activations' dtype), as transformers does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

"""Projection weights packed for oneDNN on the CPU: the CPU counterpart of triton_gemv.py.

F.linear on the CPU goes through MKL, which on AMD processors takes a slow generic path for float32 (measured on
this project's 2-core EPYC machines, one thread, SmolLM2-135M's 30 layers of projections: 50 ms at 16 rows and
1,180 ms for a 512-token chunk, against 19 and 505 ms through oneDNN) and repacks its operand on every call in
bfloat16 (16 → 11 ms at 16 rows, 11 → 5 ms at one row). oneDNN's reordered weights are packed once, at load.
A packed weight is an opaque oneDNN tensor of the same shape that only `linear` can read, so it replaces the
projection's dense weight (no second copy) everywhere but a tied LM head, whose embedding stays dense.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.float32, torch.bfloat16)  # oneDNN's CPU kernels for these run on AVX2 and AVX-512 alike
BATCH_HINT = 128  # rows oneDNN tunes the packing for: 1-512 rows measured within 10 % of a packing for each


def usable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and not weight.is_mkldnn
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ packed [N, K]ᵀ (+ bias), as F.linear computes it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def install(model) -> None:
    """Pack every projection's weight (and the LM head's, unless it is split over ranks) in place."""
    for projection in model.products():
        if not usable(projection.weight):
            continue
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(projection.weight.detach(), BATCH_HINT)
        except RuntimeError as e:  # a oneDNN build without this dtype's kernels: F.linear stays
            log.info("oneDNN cannot pack %s weights here (%s): projections use F.linear", projection.weight.dtype, e)
            return
        projection.weight = nn.Parameter(packed, requires_grad=False)
        projection.packed = True

"""A Triton matrix-vector product for one-row projections (batch-1 decode) in half precision.

Why: at batch 1 a decode step is the weights read once, and cuBLAS's choices for these shapes leave bandwidth unused.
On an H200 (`scripts/gpu_native.py --phases gemv`, docs/benchmarks.md) the 4,096-column Q/K/V and output projections
ran at ~3.1 TB/s of the 4.2 the copy reaches, and the two projections cuBLAS splits along the inputs (output, down)
added a reduction kernel and a device copy each. Here every program owns `BLOCK_N` output rows and walks all of K
once: no split, no second kernel. Accumulation is float32 (as cuBLAS does), the bias added before the one rounding.

It is a torch custom op, so torch.compile sees an opaque call and CUDA graphs capture the launch as is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch options (output rows per program, inputs per tile, warps, stages), as swept on an H200
# (`scripts/gpu_native.py --phases gemv`).
OPTIONS = (8, 512, 4, 3)
HALF = (torch.bfloat16, torch.float16)


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        if EVEN:  # no masks: wide vector loads
            x = tl.load(x_ptr + cols)
            w = tl.load(w_rows + cols[None, :])
        else:
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           options: tuple[int, int, int, int] = OPTIONS) -> None:
    n, k = weight.shape
    block_n, block_k, warps, stages = options
    _gemv[(triton.cdiv(n, block_n),)](x, weight, bias if bias is not None else out, out, n, k, weight.stride(0),
                                      HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                      EVEN=n % block_n == 0 and k % block_k == 0, num_warps=warps,
                                      num_stages=stages)


@torch.library.custom_op("tgis::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]ᵀ (+ bias [N]) → [1, N] in x's dtype."""
    out = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
    launch(x.contiguous(), weight, bias, out)
    return out


@gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(1, weight.shape[0])


def usable(weight: torch.Tensor) -> bool:
    """Half-precision, row-contiguous weights (float32 keeps cuBLAS: its results are the exactness oracle)."""
    return weight.dtype in HALF and weight.stride(1) == 1


def install(model) -> None:
    """Route the one-row products of every half-precision projection through `gemv`."""
    for layer in model.projections():
        for projection in layer.values():
            if usable(projection.weight):
                projection.matvec = gemv

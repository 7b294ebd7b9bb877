"""A Triton matrix-vector product for one-row projections (batch-1 decode) in half precision.

Why: at batch 1 a decode step is the weights read once, and cuBLAS's choices for these shapes leave bandwidth unused:
on an H200 (`scripts/gpu_native.py --phases gemv`, docs/benchmarks.md) it read the 8B shape's Q/K/V weights at
3.0 TB/s, the output projection's at 2.7 and the LM head's at 3.8, where this kernel reaches 3.5, 3.3 and 4.5; and
the two projections cuBLAS splits along the inputs (output, down) cost a reduction kernel and a device copy each.
Here every program owns `BLOCK_N` output rows and walks all of K once: no split, no second kernel. Accumulation is
float32 (as cuBLAS does), the bias added before the one rounding. The kernel also computes its input (RMSNorm),
activates a gate-up product (each program owns gate rows and the up rows that pair with them, so silu(gate) · up
is its epilogue) and adds the residual, so no small kernel runs between the products either: batch-1 decode of the
8B shape went from 4.74 to 4.18 ms per token with the first fused form (1.16 × the bandwidth floor).

It is a torch custom op, so torch.compile sees an opaque call and CUDA graphs capture the launch as is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.models.native import pdl
from runtime.models.native.pdl import release, wait

# Launch options (output rows per program, inputs per tile, warps, stages) by output size, as swept on an H200
# (`scripts/gpu_native.py --phases gemv`, medians of interleaved runs): the 8B shape's 4,096-output projections
# (output, down) run best as 256 programs of 8 warps over 16 × 1,024 tiles, Q/K/V (6,144) as 8 × 512 tiles with
# three stages, gate-up and the LM head as 16 × 256 tiles of 4 warps.
OPTIONS = {4096: (16, 1024, 8, 1), 8192: (8, 512, 4, 3), 1 << 62: (16, 256, 4, 1)}
HALF = (torch.bfloat16, torch.float16)


@triton.jit
def _accumulate(acc, squares, x, w, nw_ptr, cols, K, NORM: tl.constexpr):
    """One tile of inputs `x` (RMSNorm'd when `NORM`) times weights `w`, into the running sums."""
    if NORM:  # RMSNorm(x) · W = r · ((norm weight ⊙ x) · W): the squares summed on the way, r applied last
        x = x.to(tl.float32)
        squares += x * x
        x = x * tl.load(nw_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    return acc + w.to(tl.float32) * x.to(tl.float32)[None, :], squares


@triton.jit
def _load(x_ptr, w_rows, row_ok, cols, K, EVEN: tl.constexpr):
    if EVEN:  # no masks: wide vector loads
        return tl.load(x_ptr + cols), tl.load(w_rows + cols[None, :])
    return (tl.load(x_ptr + cols, mask=cols < K, other=0.0),
            tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0))


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, nw_ptr, res_ptr, y_ptr, N, K, stride_w, eps, scale, HAS_BIAS: tl.constexpr,
          NORM: tl.constexpr, ACTIVATE: tl.constexpr, RESIDUAL: tl.constexpr, SCALED: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, GDC: tl.constexpr):
    j = tl.arange(0, BLOCK_N)
    if ACTIVATE:  # this program's gate rows, then the up rows that pair with them (W = [gate; up])
        out = tl.program_id(0) * (BLOCK_N // 2) + j % (BLOCK_N // 2)
        rows = out + (j >= BLOCK_N // 2) * (N // 2)
        row_ok = out < N // 2
    else:
        rows = tl.program_id(0) * BLOCK_N + j
        row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    squares = tl.zeros([BLOCK_K], tl.float32)
    wait(GDC)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x, w = _load(x_ptr, w_rows, row_ok, cols, K, EVEN)
        acc, squares = _accumulate(acc, squares, x, w, nw_ptr, cols, K, NORM)
    release(GDC)
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    y = y.to(dtype)
    if ACTIVATE:  # silu(gate) · up, each rounded as the unfused modules round
        gate, up = tl.split(tl.permute(tl.reshape(y, (2, BLOCK_N // 2)), (1, 0)))
        gate, up = gate.to(tl.float32), up.to(tl.float32)
        rows = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        row_ok = rows < N // 2
        y = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype)
    if SCALED:
        y = (y.to(tl.float32) * scale).to(dtype)
    if RESIDUAL:  # residual + y, rounded as the unfused add rounds
        y = (tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dtype)
    tl.store(y_ptr + rows, y, mask=row_ok)


def options(n: int) -> tuple[int, int, int, int]:
    return OPTIONS[min(size for size in OPTIONS if size >= n)]


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           norm_weight: torch.Tensor | None = None, eps: float = 0.0, activate: bool = False,
           residual: torch.Tensor | None = None, scale: float = 1.0,
           chosen: tuple[int, int, int, int] | None = None) -> None:
    """`chosen`: launch options instead of `options(N)` (the sweep's)."""
    n, k = weight.shape
    block_n, block_k, warps, stages = chosen or options(n)
    gdc = pdl.usable(x)
    _gemv[(triton.cdiv(n, block_n),)](  # with `activate`, N = 2 × the outputs
        x, weight, out if bias is None else bias, out if norm_weight is None else norm_weight,
        out if residual is None else residual, out, n, k, weight.stride(0), eps, scale, HAS_BIAS=bias is not None,
        NORM=norm_weight is not None, ACTIVATE=activate, RESIDUAL=residual is not None,
        SCALED=residual is not None and scale != 1.0, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN=n % block_n == 0 and k % block_k == 0, GDC=gdc, num_warps=warps, num_stages=stages, launch_pdl=gdc)


@torch.library.custom_op("tgis::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, activate: bool = False,
         residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """residual + scale · (input [1, K] @ weight [N, K]ᵀ + bias [N]) → [1, N] in x's dtype (each term optional,
    `scale` taken with a residual only, each step rounded as the unfused modules round), where input is RMSNorm(x)
    with `norm_weight` and `eps` when given (in float32 throughout, where the module rounds the normalised row
    twice: within one bfloat16 step per element), else x. `activate`: the product is [gate | up] and the result
    silu(gate) · up ([1, N / 2], a gated MLP's gate-up projection)."""
    out = torch.empty(1, weight.shape[0] // 2 if activate else weight.shape[0], dtype=x.dtype, device=x.device)
    launch(x.contiguous(), weight, bias, out, norm_weight, eps, activate,
           None if residual is None else residual.contiguous(), scale)
    return out


@gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
      norm_weight: torch.Tensor | None = None, eps: float = 0.0, activate: bool = False,
      residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    return x.new_empty(1, weight.shape[0] // 2 if activate else weight.shape[0])


def usable(weight: torch.Tensor) -> bool:
    """Half-precision, row-contiguous weights (float32 keeps cuBLAS: its results are the exactness oracle)."""
    return weight.dtype in HALF and weight.stride(1) == 1


def install(model) -> None:
    """Route the one-row products of every half-precision projection (and of the LM head, unless it is split over
    ranks) through `gemv`."""
    for projection in model.products():
        if usable(projection.weight):
            projection.matvec = gemv

"""Row-wise argmax of scores on the GPU in two passes (the sampler's greedy choice, on CUDA).

Why: torch reduces one row of a 128k vocabulary in one thread block, 28 µs on an H200, which is 0.7 % of a batch-1
decode step (scripts/gpu_native.py, profile_bs1). Here programs of `BLOCK` scores each find their tile's best, and
a second kernel picks the best tile per row: a few µs. Same result as torch.argmax: the lowest index among equal
maxima, and a NaN, when there is one, wins (its lowest index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _tiles(x_ptr, best_ptr, at_ptr, nan_ptr, V, stride_x, TILES, BLOCK: tl.constexpr):
    r, t = tl.program_id(0), tl.program_id(1)
    cols = t * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    nan = x != x
    best = tl.max(tl.where(nan, float("-inf"), x), 0)
    out = r * TILES + t
    tl.store(best_ptr + out, best)
    tl.store(at_ptr + out, tl.min(tl.where(x == best, cols, V), 0))  # all -inf: the tile's first column
    tl.store(nan_ptr + out, tl.min(tl.where(nan, cols, V), 0))


@triton.jit
def _rows(best_ptr, at_ptr, nan_ptr, out_ptr, V, TILES, BLOCK_T: tl.constexpr):
    r = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    ok = t < TILES
    best = tl.load(best_ptr + r * TILES + t, mask=ok, other=float("-inf"))
    at = tl.load(at_ptr + r * TILES + t, mask=ok, other=V)
    first_nan = tl.min(tl.load(nan_ptr + r * TILES + t, mask=ok, other=V), 0)
    chosen = tl.min(tl.where(best == tl.max(best, 0), at, V), 0)  # tiles ascend: the lowest index of the best
    tl.store(out_ptr + r, tl.where(first_nan < V, first_nan, chosen).to(tl.int64))


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """[B, V] float scores (last dimension contiguous) → [B] int64 ids."""
    rows, vocab = scores.shape
    tiles = triton.cdiv(vocab, BLOCK)
    best = torch.empty(rows, tiles, dtype=torch.float32, device=scores.device)
    at, nan = (torch.empty(rows, tiles, dtype=torch.int32, device=scores.device) for _ in "an")
    out = torch.empty(rows, dtype=torch.int64, device=scores.device)
    _tiles[(rows, tiles)](scores, best, at, nan, vocab, scores.stride(0), tiles, BLOCK=BLOCK)
    _rows[(rows,)](best, at, nan, out, vocab, tiles, BLOCK_T=triton.next_power_of_2(tiles))
    return out

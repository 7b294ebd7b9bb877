"""The static inputs of a decode graph filled by one Triton kernel (CUDA; interpreted on the CPU in tests).

Why: filling them with torch ops took ~14 small kernels and two host-to-device copies per step (token ids, the
in-flight ids of async scheduling, positions, table rows, cache slots, lengths, padding rows): ~40 µs of a 4 ms
batch-1 step on an H200 (scripts/gpu_native.py, profile_bs1). Here one host-to-device copy carries, per row, its
token id, position, block-table row and the index of its in-flight id (-1: none), and one program per bucket row
writes everything, padding rows included (one token of the null block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fill(packed_ptr, prev_ptr, table_ptr, ids_ptr, positions_ptr, slots_ptr, tables_ptr, lens_ptr, rows, width,
          stride_table, stride_tables, BLOCK_SIZE: tl.constexpr, BLOCK_W: tl.constexpr):
    r = tl.program_id(0)
    real = r < rows
    token = tl.load(packed_ptr + r, mask=real, other=0)
    pos = tl.load(packed_ptr + rows + r, mask=real, other=0)
    row = tl.load(packed_ptr + 2 * rows + r, mask=real, other=0)
    pending = tl.load(packed_ptr + 3 * rows + r, mask=real, other=-1)
    token = tl.where(pending >= 0, tl.load(prev_ptr + pending, mask=pending >= 0, other=0), token)
    cols = tl.arange(0, BLOCK_W)
    table = table_ptr + row * stride_table
    tl.store(tables_ptr + r * stride_tables + cols, tl.load(table + cols, mask=real & (cols < width), other=0),
             mask=cols < width)
    block = tl.load(table + pos // BLOCK_SIZE, mask=real, other=0).to(tl.int64)
    tl.store(ids_ptr + r, token)
    tl.store(positions_ptr + r, pos)
    tl.store(slots_ptr + r, block * BLOCK_SIZE + pos % BLOCK_SIZE)
    tl.store(lens_ptr + r, (pos + 1).to(tl.int32))


def fill(packed: torch.Tensor, prev: torch.Tensor | None, block_table: torch.Tensor, size: int, block_size: int,
         ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
         lens: torch.Tensor) -> None:
    """`packed` [4, B] int64 on the device: token ids, positions, block-table rows, in-flight indices into `prev`;
    rows B .. size - 1 of the static buffers become padding."""
    rows, width = packed.shape[1], block_table.shape[1]
    _fill[(size,)](packed, packed if prev is None else prev, block_table, ids, positions, slots, tables, lens, rows,
                   width, block_table.stride(0), tables.stride(0), BLOCK_SIZE=block_size,
                   BLOCK_W=triton.next_power_of_2(width))

"""Attention on the CPU through small C++ kernels (built by cpu_kernels.py) that read the paged cache in place:
rotary + cache write (csrc/rotary_cache.cpp), decode rows (csrc/paged_decode.cpp) and prompt chunks
(csrc/paged_prompt.cpp).

The plain-torch path gathers each decode row's blocks into a padded tensor and runs scaled_dot_product_attention,
whose CPU kernel is built for many query rows: with a decode row's few (one per query head of a KV group) it
reached 4-7 GB/s, and the gather copied every cached key and value once more (SmolLM2-135M, bfloat16, 16 rows of
~400 positions, one thread: ~1.3 ms per layer, 40 % of a decode step).

Prompt chunks: scaled_dot_product_attention with the explicit mask a chunk needs (its cached context before it)
computes every masked score too; with SmolLM2's 9 query heads over 3 KV heads a 512-token prompt took 7.3 ms per
layer in bfloat16 (83 GFLOP/s), ~40 % of the prompt's step. The prompt kernel skips the blocks above the diagonal
and shares each key and value load among 8 query rows.
"""

from __future__ import annotations

import ctypes

import torch

from runtime.models.native.attention import TorchAttention
from runtime.models.native.cpu_kernels import SUFFIXES, library

LANES = 16  # the decode kernel's chunk of positions: block_size must be a multiple of it


def _applies(q: torch.Tensor, cache: torch.Tensor, meta) -> ctypes.CDLL | None:
    """The kernels' library where they serve this layer: a float32 or bfloat16 cache in the queries' dtype, a head
    size they are compiled for, whole KV-head groups, int32 block tables."""
    lib = library()
    kv_heads, dim = cache.shape[-2:]
    if (lib is None or q.dtype not in SUFFIXES or cache.dtype != q.dtype or not lib.supported_dim(dim)
            or q.shape[1] % kv_heads or meta.block_tables.dtype != torch.int32):
        return None
    return lib


def _heads_packed(*tensors: torch.Tensor) -> bool:
    """[tokens, heads, dim] with dims and heads packed; the token stride is free (views of one fused projection)."""
    return all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in tensors)


class CpuAttention(TorchAttention):
    """TorchAttention with the rotary embedding and cache write, decode rows and prompt chunks through the C++
    kernels where they apply (`_applies`; the decode kernel also needs block_size a multiple of 16)."""

    def rotate_and_store(self, q, k, v, cos, sin, cache, meta):
        lib = _applies(q, cache, meta)
        if (lib is None or not _heads_packed(q, k, v) or cos.stride(1) != 1 or sin.stride(0) != cos.stride(0)
                or k.dtype != q.dtype or v.dtype != q.dtype or cos.dtype != q.dtype or not cache.is_contiguous()):
            return super().rotate_and_store(q, k, v, cos, sin, cache, meta)
        rotated = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        getattr(lib, f"rotary_cache_{SUFFIXES[q.dtype]}")(
            rotated.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            cache.data_ptr(), slots.data_ptr(), q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.stride(0),
            k.stride(0), v.stride(0), cos.stride(0), cache.shape[1] * cache.shape[2])
        return rotated, None, None  # the prompt kernel reads keys and values from the cache

    def decode(self, q, cache, meta, scale, window, out) -> None:
        lib = _applies(q, cache, meta)
        if lib is None or cache.shape[2] % LANES:
            return super().decode(q, cache, meta, scale, window, out)
        d = meta.num_decodes
        q, tables, lens = q[:d].contiguous(), meta.block_tables[:d].contiguous(), meta.seq_lens[:d].contiguous()
        getattr(lib, f"decode_{SUFFIXES[q.dtype]}")(
            out.data_ptr(), q.data_ptr(), cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), d, q.shape[1],
            cache.shape[-2], cache.shape[-1], cache.shape[1], cache.shape[2], tables.shape[1], scale, window or 0,
            torch.get_num_threads())

    def prompts(self, q, k, v, cache, meta, scale, window, out) -> None:
        d, rows = meta.num_decodes, len(meta.query_lens_host)
        if rows == d:
            return None
        lib = _applies(q, cache, meta)
        if lib is None or not out.is_contiguous():
            return super().prompts(q, k, v, cache, meta, scale, window, out)
        q = q.contiguous()  # the kernel finds a row's tokens by their index in the step
        tables = meta.block_tables[d:rows].contiguous()
        starts, lens = meta.query_start[d:rows + 1].contiguous(), meta.seq_lens[d:rows].contiguous()
        getattr(lib, f"prompt_{SUFFIXES[q.dtype]}")(
            out.data_ptr(), q.data_ptr(), cache.data_ptr(), tables.data_ptr(), starts.data_ptr(), lens.data_ptr(),
            rows - d, q.shape[1], cache.shape[-2], cache.shape[-1], cache.shape[1], cache.shape[2], tables.shape[1],
            scale, window or 0, torch.get_num_threads())

"""Attention over the paged KV cache, behind one interface, for a flattened batch of decodes and prompt chunks.

A step's tokens are flattened: rows [0, num_decodes) are single-token decodes (token i of row i), then each prompt
chunk's tokens in order. Every layer's backend rotates the step's queries and keys (rotary position embedding),
writes keys and values into their cache slots, then each query attends to its sequence's cached keys up to its own
position (and, with a sliding window, no further back).

Backends: `TorchAttention` (plain torch over the block tables; runs everywhere and is the test oracle), its CPU
refinement `CpuAttention` (decode rows through a C++ kernel, runtime/models/native/cpu_attention.py) and the Triton
kernels of runtime/models/native/triton_attention.py (CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from runtime.models.native.layers import apply_rotary


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, W] int32: each row's blocks
    seq_lens: torch.Tensor  # [B] int32: each row's context length once this step's tokens are in
    query_start: torch.Tensor  # [B + 1] int32: first token of each row in the flattened batch
    num_decodes: int  # rows (= tokens) [0, num_decodes) have one query token each
    seq_lens_host: list[int]  # host copies, so that host-side loops need no device synchronisation
    query_lens_host: list[int]


class AttentionBackend(Protocol):
    reads_unwritten_slots: bool  # reads whole blocks (masked): a fresh block's slots must hold finite values

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] of this step, not yet rotated (views of one matmul's output); cos/sin [T, D]
        of the tokens' positions; cache [2, blocks, block_size, KVH, D] of this layer. Returns [T, H, D]."""


FP8 = torch.float8_e4m3fn  # `--kv-cache-dtype fp8`: half the bytes of a bfloat16 cache, read and held
FP8_MAX = 448.0  # its largest finite value: larger keys and values are stored saturated


def storage(cache: torch.Tensor) -> torch.Tensor:
    """The cache as raw bytes when it holds float8 (index copies and fills exist for uint8 on every device, not for
    float8); as it is otherwise."""
    return cache.view(torch.uint8) if cache.dtype == FP8 else cache


def stored(t: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """`t` in the cache's element type."""
    return t.clamp(-FP8_MAX, FP8_MAX).to(FP8) if cache.dtype == FP8 else t.to(cache.dtype)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store this step's keys and values in their slots (a padding row writes into the null block)."""
    raw = storage(cache)
    for i, t in enumerate((k, v)):
        raw[i].view(-1, *cache.shape[-2:]).index_copy_(0, slots, storage(stored(t, cache)))


def _gathered(cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of `blocks` ([..., n] block ids) laid end to end: [..., n * block_size, KVH, D].
    One index_select of whole blocks (row copies): 3x faster on the CPU than advanced indexing."""
    kv = cache.index_select(1, blocks.flatten())
    kv = kv.view(2, *blocks.shape[:-1], blocks.shape[-1] * cache.shape[2], *cache.shape[3:])
    return kv[0], kv[1]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
            ) -> torch.Tensor:
    """q [B, n, H, D] against keys/values [B, L, KVH, D] under mask [B, n, L] (True: may attend). The query heads of
    each KV-head group are stacked along the query axis, so one 4-D call of scaled_dot_product_attention (PyTorch's
    fused CPU kernel; 3-D or enable_gqa inputs fall back to a slower path) serves grouped-query attention without
    repeating keys and values. Returns [B, n, H, D]."""
    b, n, heads, d = q.shape
    kv_heads = keys.shape[2]
    group = heads // kv_heads
    grouped = q.view(b, n, kv_heads, group, d).permute(0, 2, 1, 3, 4).reshape(b, kv_heads, n * group, d)
    rows = mask.repeat_interleave(group, dim=1)[:, None] if group > 1 else mask[:, None]
    out = F.scaled_dot_product_attention(grouped, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=rows,
                                         scale=scale)
    return out.view(b, kv_heads, n, group, d).permute(0, 2, 1, 3, 4).reshape(b, n, heads, d)


def _length_groups(lengths: list[int], max_groups: int = 4, ratio: float = 0.7) -> list[tuple[list[int], int]]:
    """Decode rows in groups of similar context length, each (rows, longest): padding every row to the batch's
    longest context made gathering and attending ~1.7x the work on the CPU for lengths spread over 32-768. A group
    closes when a row is shorter than `ratio` of its longest; at most `max_groups` groups."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[tuple[list[int], int]] = []
    for i in order:
        if groups and (lengths[i] >= ratio * groups[-1][1] or len(groups) == max_groups):
            groups[-1][0].append(i)
        else:
            groups.append(([i], lengths[i]))
    return groups


class TorchAttention:
    """Gathers each row's blocks and runs scaled_dot_product_attention: plain torch over the block tables. A float8
    cache is read back in the queries' type; a whole prompt then attends to its keys as the cache holds them, as the
    Triton kernels do."""

    reads_unwritten_slots = True

    def __call__(self, q, k, v, cos, sin, cache, meta, scale, window):
        q, k, v = self.rotate_and_store(q, k, v, cos, sin, cache, meta)
        out = torch.empty_like(q)
        if meta.num_decodes:
            self.decode(q, cache, meta, scale, window, out)
        self.prompts(q, k, v, cache, meta, scale, window, out)
        return out

    def rotate_and_store(self, q, k, v, cos, sin, cache, meta
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Rotated queries, and this step's keys and values as attention reads them back (None: read them from the
        cache), once written into their cache slots."""
        q, k = apply_rotary(q, k, cos, sin)
        v = v.contiguous()
        if cache.dtype != q.dtype:
            k, v = stored(k, cache).to(q.dtype), stored(v, cache).to(q.dtype)
        write_kv(cache, k, v, meta.slot_mapping)
        return q, k, v

    def decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
               window: int | None, out: torch.Tensor) -> None:
        """Attention of the decode rows [0, num_decodes) (rotated queries; their keys are in the cache) into
        `out`'s first rows."""
        block_size = cache.shape[2]
        d = meta.num_decodes
        for rows, length in _length_groups(meta.seq_lens_host[:d]):
            index = torch.tensor(rows, device=q.device)
            blocks = meta.block_tables[index, : -(-length // block_size)].long()
            keys, values = (t.to(q.dtype) for t in _gathered(cache, blocks))
            pos = torch.arange(keys.shape[1], device=q.device)  # keys, values: [rows, L, KVH, D]
            lens = meta.seq_lens[index, None]
            mask = pos[None, :] < lens
            if window is not None:
                mask &= pos[None, :] >= lens - window
            out[index] = _attend(q[index, None], keys, values, mask[:, None], scale)[:, 0]

    def prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, window: int | None, out: torch.Tensor) -> None:
        """Attention of each prompt chunk's rows (after the decode rows) into `out`."""
        block_size = cache.shape[2]
        start = meta.num_decodes
        for row in range(start, len(meta.query_lens_host)):
            n, length = meta.query_lens_host[row], meta.seq_lens_host[row]
            if n == length and k is not None:  # a whole prompt: its keys are this step's
                keys, values = k[start:start + n], v[start:start + n]
            else:
                blocks = meta.block_tables[row, : -(-length // block_size)].long()
                keys, values = (t[:length].to(q.dtype) for t in _gathered(cache, blocks))
            qpos = torch.arange(length - n, length, device=q.device)[:, None]
            kpos = torch.arange(length, device=q.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            out[start:start + n] = _attend(q[None, start:start + n], keys[None], values[None], mask[None], scale)[0]
            start += n

"""Attention over the paged KV cache, behind one interface, for a flattened batch of decodes and prompt chunks.

A step's tokens are flattened: rows [0, num_decodes) are single-token decodes (token i of row i), then each prompt
chunk's tokens in order. Every layer first writes the step's keys and values into their cache slots, then each
query attends to its sequence's cached keys up to its own position (and, with a sliding window, no further back).

Backends: `TorchAttention` (plain torch over the block tables; runs everywhere and is the test oracle) and the
Triton kernels of runtime/models/native/triton_attention.py (CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, W] int32: each row's blocks
    seq_lens: torch.Tensor  # [B] int32: each row's context length once this step's tokens are in
    query_start: torch.Tensor  # [B + 1] int32: first token of each row in the flattened batch
    num_decodes: int  # rows (= tokens) [0, num_decodes) have one query token each
    seq_lens_host: list[int]  # host copies, so that host-side loops need no device synchronisation
    query_lens_host: list[int]
    max_decode_len: int = 0  # longest context among decode rows


class AttentionBackend(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] of this step; cache [2, blocks, block_size, KVH, D] of this layer.
        Returns [T, H, D]."""


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store this step's keys and values in their slots (a padding row writes into the null block)."""
    cache[0].view(-1, *cache.shape[-2:]).index_copy_(0, slots, k)
    cache[1].view(-1, *cache.shape[-2:]).index_copy_(0, slots, v)


def _gathered(cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of `blocks` ([..., n] block ids) laid end to end: [..., n * block_size, KVH, D]."""
    k, v = cache[0][blocks], cache[1][blocks]
    return k.flatten(-4, -3), v.flatten(-4, -3)


class TorchAttention:
    """Gathers each row's blocks and runs scaled_dot_product_attention (the math transformers' sdpa path runs)."""

    def __call__(self, q, k, v, cache, meta, scale, window):
        write_kv(cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        block_size = cache.shape[2]
        d = meta.num_decodes
        if d:
            nb = -(-meta.max_decode_len // block_size)
            keys, values = _gathered(cache, meta.block_tables[:d, :nb].long())  # [d, L, KVH, D]
            pos = torch.arange(keys.shape[1], device=q.device)
            lens = meta.seq_lens[:d, None]
            mask = pos[None, :] < lens
            if window is not None:
                mask &= pos[None, :] >= lens - window
            out[:d] = F.scaled_dot_product_attention(
                q[:d].unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[:, None, None, :],
                scale=scale, enable_gqa=True).squeeze(2)
        start = d
        for row in range(d, len(meta.query_lens_host)):
            n, length = meta.query_lens_host[row], meta.seq_lens_host[row]
            blocks = meta.block_tables[row, : -(-length // block_size)].long()
            keys, values = (t[:length].transpose(0, 1) for t in _gathered(cache, blocks))  # [KVH, L, D]
            query = q[start:start + n].transpose(0, 1)  # [H, n, D]
            if n == length and window is None:  # a whole prompt: plain causal attention
                o = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
            else:
                qpos = torch.arange(length - n, length, device=q.device)[:, None]
                kpos = torch.arange(length, device=q.device)[None, :]
                mask = kpos <= qpos
                if window is not None:
                    mask &= kpos > qpos - window
                o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:start + n] = o.transpose(0, 1)
            start += n
        return out

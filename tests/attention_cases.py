"""Random paged-attention steps for testing attention backends against the plain-torch oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.models.native.attention import AttentionMetadata


@dataclass
class Step:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache: torch.Tensor
    meta: AttentionMetadata

    def run(self, backend, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The backend's output and the cache it wrote (on a copy of the step's cache)."""
        cache = self.cache.clone()
        out = backend(self.q, self.k, self.v, self.cos, self.sin, cache, self.meta, self.q.shape[-1] ** -0.5, window)
        return out, cache


def random_step(decodes: list[int], chunks: list[tuple[int, int]], seed: int, heads: int = 8, kv_heads: int = 2,
                dim: int = 32, block_size: int = 16, cache_dtype: torch.dtype = torch.float32,
                dtype: torch.dtype = torch.float32, num_blocks: int | None = None, table_width: int | None = None
                ) -> Step:
    """Random cache and step: `decodes` context lengths, `chunks` (cached, new) token counts, blocks in random
    order (a pool of `num_blocks`, tables `table_width` wide: by default just enough); queries, keys and values in
    `dtype`."""
    g = torch.Generator().manual_seed(seed)
    rows = len(decodes) + len(chunks)
    qlens = [1] * len(decodes) + [n for _, n in chunks]
    lens = list(decodes) + [c + n for c, n in chunks]
    width = table_width or max(-(-n // block_size) for n in lens)
    blocks = num_blocks or rows * width + 1
    cache = torch.randn(2, blocks, block_size, kv_heads, dim, generator=g).to(cache_dtype)
    tables = (torch.randperm(blocks - 1, generator=g) + 1)[: rows * width].view(rows, width).to(torch.int32)
    q = torch.randn(sum(qlens), heads, dim, generator=g)
    k, v = torch.randn(sum(qlens), kv_heads, dim, generator=g), torch.randn(sum(qlens), kv_heads, dim, generator=g)
    positions = torch.tensor([p for r in range(rows) for p in range(lens[r] - qlens[r], lens[r])])
    angles = positions[:, None] * 10000.0 ** (-torch.arange(0, dim, 2) / dim)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k, v, cos, sin = (t.to(dtype) for t in (q, k, v, cos, sin))
    slots = [int(tables[r, p // block_size]) * block_size + p % block_size
             for r in range(rows) for p in range(lens[r] - qlens[r], lens[r])]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(torch.tensor(slots), tables, torch.tensor(lens, dtype=torch.int32),
                             torch.tensor(starts, dtype=torch.int32), len(decodes), lens, qlens)
    return Step(q, k, v, cos, sin, cache, meta)

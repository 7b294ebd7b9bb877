"""KV-cache capacity: which sequences the cache can hold, asked by the scheduler before it plans a step.

Two managers behind one interface (`admit` / `grow` / `commit` / `release`):
- `PagedKVManager` (native runner): a pool of fixed-size blocks, a block table per sequence, and hash-based prefix
  caching. A full block is registered under a chained hash of (parent hash, its tokens, the sequence's salt: prompt
  prefix and LoRA adapter), so a later sequence with the same leading tokens reuses the computed KV. A hit is checked
  token for token. Blocks nobody references stay cached until the pool needs them (least recently used first).
- `PaddedKVManager` (transformers runner): slot accounting for a left-padded batch, B rows × (longest decoder context
  + longest encoder input), padding included.
Sequences carry their own bookkeeping (`blocks`, `block_hashes`, `num_computed`), so every call is O(blocks touched).
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

import torch

from runtime.engine.sequence import Sequence

NULL_BLOCK = 0  # never handed out: padding rows (CUDA-graph buckets) point their writes here


class KVManager(Protocol):
    def admit(self, seq: Sequence) -> bool:
        """Reserve room for all of `seq`'s tokens (may set `seq.num_computed` from cached blocks); False if it does
        not fit now."""

    def grow(self, seq: Sequence) -> bool:
        """Room for the token `seq`'s next decode step computes; False if the cache is full."""

    def commit(self, seq: Sequence) -> None:
        """After a step computed tokens of `seq`: make its newly full blocks reusable."""

    def release(self, seq: Sequence) -> None:
        """`seq` left the batch (finished, aborted, preempted): give its room back."""


@dataclass(eq=False)
class Block:
    id: int
    ref: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] | None = None  # what a hit is checked against


@dataclass
class CacheCounters:
    """Prefix-cache effect in tokens: `queries` = prompt tokens looked up, `hits` = those found computed."""

    queries: int = 0
    hits: int = 0


def block_hash(parent: int | None, tokens: tuple[int, ...], salt: tuple) -> int:
    return hash((parent, tokens, salt))


class PagedKVManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(1, num_blocks))  # never-registered blocks; block 0 is the null block
        self.cached: dict[int, Block] = {}  # hash -> block (referenced or not)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, least recent first
        self.counters = CacheCounters()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- the interface -------------------------------------------------------------------------------------
    def admit(self, seq: Sequence) -> bool:
        hits, hashes = self._lookup(seq)
        needed = self.blocks_for(len(seq.tokens)) - len(hits)
        reusable = sum(1 for b in hits if b.ref == 0)  # leave the evictable pool when taken
        if needed > self.num_free - reusable:
            return False
        for b in hits:
            if b.ref == 0:
                del self.evictable[b.id]
            b.ref += 1
        seq.blocks = [b.id for b in hits] + [self._take().id for _ in range(needed)]
        seq.block_hashes = hashes
        seq.num_computed = len(hits) * self.block_size
        if self.prefix_caching and seq.prefix_cacheable:
            self.counters.queries += len(seq.tokens)
            self.counters.hits += seq.num_computed
        return True

    def grow(self, seq: Sequence) -> bool:
        if len(seq.blocks) >= self.blocks_for(seq.num_tokens):
            return True
        if not self.num_free:
            return False
        seq.blocks.append(self._take().id)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the blocks `seq` filled (a block already cached under the same hash by a sequence computed at
        the same time keeps its place; ours stays private). A block whose last id is still on the device (async
        scheduling) waits for the next commit."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), min(seq.num_computed, len(seq.tokens)) // bs):
            tokens = tuple(seq.tokens[i * bs:(i + 1) * bs])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens, seq.cache_salt)
            seq.block_hashes.append(h)
            block = self.blocks[seq.blocks[i]]
            if h not in self.cached and block.hash is None:
                block.hash, block.tokens = h, tokens
                self.cached[h] = block

    def release(self, seq: Sequence) -> None:
        for block_id in reversed(seq.blocks):  # tail blocks become the first to be evicted
            block = self.blocks[block_id]
            block.ref -= 1
            if block.ref == 0:
                if block.hash is not None:
                    self.evictable[block_id] = None
                else:
                    self.free.append(block_id)
        seq.blocks = []
        seq.block_hashes = []
        seq.num_computed = 0

    # ---- internals -----------------------------------------------------------------------------------------
    def _lookup(self, seq: Sequence) -> tuple[list[Block], list[int]]:
        """Cached blocks holding `seq`'s leading full blocks. The last token is never taken from the cache: its
        logits must be computed, and a shared block must never be written."""
        if not (self.prefix_caching and seq.prefix_cacheable):
            return [], []
        bs, hits, hashes, parent = self.block_size, [], [], None
        for i in range((len(seq.tokens) - 1) // bs):
            tokens = tuple(seq.tokens[i * bs:(i + 1) * bs])
            parent = block_hash(parent, tokens, seq.cache_salt)
            block = self.cached.get(parent)
            if block is None or block.tokens != tokens:
                break
            hits.append(block)
            hashes.append(parent)
        return hits, hashes

    def _take(self) -> Block:
        if self.free:
            block = self.blocks[self.free.popleft()]
        else:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.cached[block.hash]
            block.hash = block.tokens = None
        block.ref = 1
        return block

    def check(self, holders: list[Sequence]) -> None:
        """Debug invariant: every block is free, cached and unreferenced, or referenced exactly by its holders."""
        owners = [0] * len(self.blocks)
        for seq in holders:
            for block_id in seq.blocks:
                owners[block_id] += 1
        free, evictable = set(self.free), set(self.evictable)
        if len(free) != len(self.free) or free & evictable or NULL_BLOCK in free | evictable:
            raise AssertionError("a block is listed twice among free and evictable blocks")
        for block in self.blocks[1:]:
            state = (block.id in free) + (block.id in evictable) + (owners[block.id] > 0)
            if state != 1 or block.ref != owners[block.id]:
                raise AssertionError(f"block {block.id}: ref {block.ref}, {owners[block.id]} holders, "
                                     f"free={block.id in free}, evictable={block.id in evictable}")
            if block.id in evictable and (block.hash is None or self.cached.get(block.hash) is not block):
                raise AssertionError(f"evictable block {block.id} is not in the cache")
        for h, block in self.cached.items():
            if block.hash != h:
                raise AssertionError(f"cache entry {h} points at block {block.id} with hash {block.hash}")


class PaddedKVManager:
    """B rows × (longest decoder context + longest encoder input) slots, charged after the step that follows."""

    def __init__(self, capacity: int, encoder_decoder: bool):
        self.capacity = capacity
        self.encoder_decoder = encoder_decoder
        self.rows: dict[str, tuple[int, int]] = {}  # seq id -> (decoder length, encoder length) held
        self._max: tuple[int, int] | None = (0, 0)  # None: recompute after a release

    def _fits(self, seq_id: str, dec: int, enc: int) -> bool:
        if self._max is None:
            self._max = tuple(max(v) for v in zip(*self.rows.values(), strict=True)) if self.rows else (0, 0)
        rows = len(self.rows) + (seq_id not in self.rows)
        return rows * (max(self._max[0], dec) + max(self._max[1], enc)) <= self.capacity

    def _hold(self, seq: Sequence, dec: int) -> bool:
        enc = seq.encoder_length if self.encoder_decoder else 0
        if not self._fits(seq.id, dec, enc):
            return False
        self.rows[seq.id] = (dec, enc)
        self._max = (max(self._max[0], dec), max(self._max[1], enc))
        return True

    def admit(self, seq: Sequence) -> bool:
        return self._hold(seq, len(seq.tokens) + 1)

    def grow(self, seq: Sequence) -> bool:
        return self._hold(seq, len(seq.tokens) + 1)

    def commit(self, seq: Sequence) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        if self.rows.pop(seq.id, None) is not None:
            self._max = None
        seq.num_computed = 0


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

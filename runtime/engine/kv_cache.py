"""KV-cache capacity accounting for the padded batch layout.

A padded batch of B rows whose longest decoder context is T (and longest encoder input S) holds B × (T + S) KV
slots, padding included. The manager decides whether a batch (optionally with new rows) still fits after the next
step; the scheduler queues or preempts on its answer. Capacity is a slot count: given, or sized from free memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq

import torch

from runtime.engine.sequence import Sequence


class KVCacheManager:
    def __init__(self, capacity: int, start_id: int | None):
        self.capacity = capacity
        self.start_id = start_id  # decoder start id for encoder-decoder models, None for decoder-only

    def footprint(self, seqs: Seq[Sequence], grow: int = 1) -> int:
        """Slots the padded batch of `seqs` holds once each row has grown by `grow` tokens."""
        if not seqs:
            return 0
        dec = max(s.decoder_length(self.start_id) for s in seqs) + grow
        enc = 0 if self.start_id is None else max(s.encoder_length() for s in seqs)
        return len(seqs) * (dec + enc)

    def fits(self, seqs: Seq[Sequence], grow: int = 1) -> bool:
        return self.footprint(seqs, grow) <= self.capacity


def bytes_per_slot(cache_tensors: list[torch.Tensor], slots: int) -> int:
    return max(1, sum(t.numel() * t.element_size() for t in cache_tensors) // max(1, slots))


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def size_capacity(per_slot: int, device: torch.device, fraction: float, max_useful: int, minimum: int) -> int:
    """Slots that fit in `fraction` of free memory, capped at what the batch limits can ever use."""
    fit = int(free_memory_bytes(device) * fraction) // per_slot
    return max(minimum, min(fit, max_useful))

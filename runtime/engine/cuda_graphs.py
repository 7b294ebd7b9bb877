"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once after the KV cache exists.

A decode-only step of B rows fills the first B entries of static input buffers (token ids, positions, cache slots,
block tables, lengths), pads the rest of its bucket with rows that attend to one token of the null block, and
replays the bucket's graph: embedding, every layer, final norm and LM head in one launch. Sampling stays outside
the graph. Steps with prompt chunks, LoRA rows or more rows than the largest bucket run eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from runtime.engine.staging import to_device
from runtime.models.native.attention import AttentionMetadata, TorchAttention

if TYPE_CHECKING:
    from runtime.engine.native_runner import NativeRunner, _SeqState
    from runtime.engine.plan import StepPlan

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to (and including) the largest batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    """`capture=False` runs the same padded static-buffer path eagerly (how the CPU tests exercise it)."""

    def __init__(self, runner: NativeRunner, max_batch: int, capture: bool = True):
        self.runner = runner
        self.triton_inputs = not isinstance(runner.backend, TorchAttention)  # Triton runs here
        self.sizes = buckets(max_batch)
        dev, top = runner.device, self.sizes[-1]
        width = runner.block_table.shape[1]
        self.ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.slots = torch.zeros(top, dtype=torch.long, device=dev)
        self.tables = torch.zeros(top, width, dtype=torch.int32, device=dev)
        self.lens = torch.ones(top, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            pool = torch.cuda.graph_pool_handle()
            started = time.monotonic()
            for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                self._capture(size, pool)
            log.info("captured %d decode graphs (batch %s) in %.1f s", len(self.sizes), self.sizes,
                     time.monotonic() - started)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(self.slots[:size], self.tables[:size], self.lens[:size], self.query_start[:size + 1],
                                 size, [1] * size, [1] * size)

    @torch.inference_mode()
    def _forward(self, size: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model(model.embed(self.ids[:size]), self.positions[:size], self.runner.caches, self._meta(size),
                       self.runner.backend)
        return model.logits(hidden)

    def _capture(self, size: int, pool) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(size)  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.logits[size] = self._forward(size)
        self.graphs[size] = graph

    def fits(self, rows: int) -> bool:
        return rows <= self.sizes[-1]

    def run(self, plan: StepPlan, states: list[_SeqState]) -> torch.Tensor:
        """Logits [B, V] of a decode-only plan."""
        b = len(plan.rows)
        size = next(s for s in self.sizes if s >= b)
        runner = self.runner
        # ids, positions, table rows, in-flight indices: a fresh pinned block per step (the previous step's copy may
        # still be queued)
        dev = to_device([[r.tokens[0] for r in plan.rows], [r.start for r in plan.rows], [s.row for s in states],
                         [r.pending for r in plan.rows]], torch.long, runner.device)
        if self.triton_inputs:
            from runtime.engine.triton_graph_inputs import fill

            fill(dev, plan.prev_tokens, runner.block_table, size, runner.block_size, self.ids, self.positions,
                 self.slots, self.tables, self.lens)
        else:
            self._fill(plan, dev, size)
        if self.graphs:
            self.graphs[size].replay()
            return self.logits[size][:b]
        return self._forward(size)[:b]

    def _fill(self, plan: StepPlan, dev: torch.Tensor, size: int) -> None:
        """The static inputs with torch ops (`triton_graph_inputs.fill` does it in one kernel where Triton runs)."""
        b = len(plan.rows)
        runner = self.runner
        self.ids[:b], self.positions[:b] = dev[0], dev[1]
        plan.take_pending(self.ids, list(range(b)))
        tables = runner.block_table[dev[2]]
        self.tables[:b] = tables
        bs = runner.block_size
        self.slots[:b] = tables.gather(1, (dev[1] // bs)[:, None]).squeeze(1).long() * bs + dev[1] % bs
        self.lens[:b] = (dev[1] + 1).to(torch.int32)
        if size > b:  # padding rows: one token of the null block
            self.ids[b:size] = 0
            self.positions[b:size] = 0
            self.slots[b:size] = 0
            self.tables[b:size] = 0
            self.lens[b:size] = 1

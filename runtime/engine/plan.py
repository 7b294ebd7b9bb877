"""The step contract between the scheduler, the engine core and the model runners (vLLM v1's shape).

Every step the scheduler writes a `StepPlan`: for each scheduled sequence, which of its tokens to compute now (one
for a decode, a chunk of its prompt otherwise), and which sequences' runner state can be dropped. A runner turns a
plan into a `ModelOutput` and never sees scheduler or sequence objects; the core never sees runner internals. Plans
are plain picklable data: the tensor-parallel runner sends them to the other ranks as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.engine.lora import LoraRef
from runtime.engine.staging import to_device


@dataclass
class RowPlan:
    """One sequence's share of a step.

    `tokens` are positions `start .. start + len(tokens) - 1` of the sequence ([prompt-prefix placeholders] + prompt
    + generated for decoder-only models; [placeholders] + decoder start + generated for encoder-decoder ones). The
    row's last position is sampled when `sample` is set (the row reaches the sequence's last token)."""

    seq_id: str
    tokens: list[int]
    start: int
    sample: bool
    prompt_logits: bool = False  # logits of every position of this row (input-token details)
    # set on the first row of a sequence (and again after a preemption): the runner holds nothing for it yet
    new: bool = False
    new_blocks: list[int] = field(default_factory=list)  # paged runners: KV blocks appended to the table this step
    reused_blocks: int = 0  # the first `reused_blocks` of them hold cached KV (prefix hit); the rest are fresh
    encoder_ids: list[int] | None = None  # encoder-decoder models, new rows: [placeholders] + prompt
    decoder_prefix: torch.Tensor | None = None  # new rows: prompt-tuning embeddings of the first positions
    encoder_prefix: torch.Tensor | None = None
    lora: LoraRef | None = None  # new rows: the sequence's adapter
    # async scheduling: the row's last token was sampled by the step still in flight and is only on the device:
    # `tokens[-1]` is a placeholder, the id is `StepPlan.prev_tokens[pending]`
    pending: int = -1

    @property
    def is_decode(self) -> bool:
        return len(self.tokens) == 1 and not self.new


@dataclass
class StepPlan:
    """Rows in order: every decode row first, then prompt chunks. `released` sequences left the batch (finished,
    aborted or preempted) since the last plan: their runner state goes."""

    rows: list[RowPlan]
    released: list[str] = field(default_factory=list)
    prev_tokens: torch.Tensor | None = None  # the in-flight step's sampled ids, on the device (rows' `pending`)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)

    def take_pending(self, ids: torch.Tensor, offsets: list[int]) -> None:
        """Write the rows' in-flight ids into `ids` (row i's last token at `offsets[i]`), device to device."""
        pairs = [(offsets[i], r.pending) for i, r in enumerate(self.rows) if r.pending >= 0]
        if pairs:
            index = to_device(pairs, torch.long, ids.device)
            ids[index[:, 0]] = self.prev_tokens[index[:, 1]]


@dataclass
class ModelOutput:
    """`logits` [n, V]: one row per plan row with `sample`, in plan order. `prompt_logits`: for rows that asked,
    [len(tokens), V] with position i predicting token i + 1."""

    logits: torch.Tensor
    prompt_logits: dict[str, torch.Tensor] = field(default_factory=dict)

"""Per-request engine state: what has been generated, its text stream, its RNG."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from runtime.engine.model_runner import PrefillItem
from runtime.engine.request import EngineRequest, GenerationParams
from runtime.engine.stopping import DecodeStream


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: EngineRequest
    stream: DecodeStream
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    first_scheduled: float | None = None  # when it first entered a batch (queue time ends here)
    input_details_sent: bool = False
    aborted: bool = False

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> GenerationParams:
        return self.request.params

    @property
    def prompt(self) -> list[int]:
        return self.request.input_ids

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.generated)

    def decoder_tokens(self, start_id: int | None) -> list[int]:
        """Decoder ids the cache must hold: prompt + generated (decoder-only) or start + generated (seq2seq).
        Including already generated ids is what makes a preempted request resume by recomputation."""
        head = self.prompt if start_id is None else [start_id]
        return head + self.generated

    def prefill_item(self, start_id: int | None) -> PrefillItem:
        return PrefillItem(
            tokens=self.decoder_tokens(start_id),
            encoder_ids=None if start_id is None else self.prompt,
            prompt_logits=self.params.input_tokens and not self.input_details_sent and start_id is None,
        )

    def deadline_passed(self, now: float) -> bool:
        return self.params.deadline is not None and now >= self.params.deadline

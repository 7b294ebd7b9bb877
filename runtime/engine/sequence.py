"""Per-request engine state: what has been generated, its text stream, its RNG."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from runtime.engine.guided import GrammarState
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
    guide: GrammarState | None = None  # guided decoding: set (compiled) before the sequence is scheduled

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

    def _virtual(self, part: str) -> int:
        """Virtual (prompt-prefix) positions before the `part` ("decoder"/"encoder") ids."""
        prefix = self.request.prefix
        return 0 if prefix is None else getattr(prefix, f"{part}_length")

    def _with_prefix(self, ids: list[int], part: str) -> list[int]:
        """`ids` after the prefix's virtual positions of `part`, shown as a placeholder id."""
        length = self._virtual(part)
        return [self.request.prefix.placeholder_id] * length + ids if length else ids

    def decoder_length(self, start_id: int | None) -> int:
        """len(decoder_tokens(start_id)) without building the list (the scheduler asks every step)."""
        return self._virtual("decoder") + (len(self.prompt) if start_id is None else 1) + len(self.generated)

    def encoder_length(self) -> int:
        """len(prefixed_prompt(True)) without building the list."""
        return self._virtual("encoder") + len(self.prompt)

    def decoder_tokens(self, start_id: int | None) -> list[int]:
        """Decoder ids the cache must hold: [prefix] + prompt + generated (decoder-only) or [prefix] + start +
        generated (seq2seq). Including already generated ids is what makes a preempted request resume by
        recomputation."""
        return self._with_prefix(self.prompt if start_id is None else [start_id], "decoder") + self.generated

    def prefixed_prompt(self, encoder_decoder: bool) -> list[int]:
        """[prefix] + prompt: the encoder input (encoder-decoder) or the decoder-only prompt; the positions that
        input-token details cover."""
        return self._with_prefix(self.prompt, "encoder" if encoder_decoder else "decoder")

    def prefill_item(self, start_id: int | None) -> PrefillItem:
        prefix = self.request.prefix
        return PrefillItem(
            tokens=self.decoder_tokens(start_id),
            encoder_ids=None if start_id is None else self.prefixed_prompt(True),
            prompt_logits=self.params.input_tokens and not self.input_details_sent and start_id is None,
            decoder_prefix=None if prefix is None else prefix.decoder,
            encoder_prefix=None if prefix is None else prefix.encoder,
            lora=self.request.lora,
        )

    def deadline_passed(self, now: float) -> bool:
        return self.params.deadline is not None and now >= self.params.deadline

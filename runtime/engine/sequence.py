"""Per-request engine state: its tokens, how many of them the KV cache holds, its text stream, its RNG."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from runtime.engine.guided import GrammarState
from runtime.engine.request import EngineRequest, GenerationParams, TokenDetail
from runtime.engine.sampler import TokenHistory
from runtime.engine.stopping import DecodeStream


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """`tokens` is what the decoder's cache must hold: [prefix placeholders] + prompt + generated (decoder-only), or
    [prefix placeholders] + decoder start + generated (encoder-decoder). It grows by one id per generated token, so
    nothing per step is proportional to the context. A preempted sequence keeps `tokens` and is recomputed."""

    request: EngineRequest
    stream: DecodeStream
    generator: torch.Generator | None
    tokens: list[int]
    encoder_ids: list[int] | None = None  # encoder-decoder: [prefix placeholders] + prompt
    prompt_length: int = 0  # leading `tokens` that are input (what input-token details cover, decoder-only)
    history: TokenHistory | None = None  # repetition-penalty ids, made on first use
    guide: GrammarState | None = None  # guided decoding: set (compiled) before the sequence is scheduled
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # leading tokens whose KV the cache holds
    blocks: list[int] = field(default_factory=list)  # paged KV: block table
    block_hashes: list[int] = field(default_factory=list)  # paged KV: hashes of the leading full blocks
    runner_has_state: bool = False  # the runner holds this sequence (cleared when it is released)
    sent_blocks: int = 0  # block-table entries the runner already has
    first_scheduled: float | None = None  # when it first entered a batch (queue time ends here)
    input_details: list[TokenDetail] = field(default_factory=list)  # accumulated over prompt chunks
    input_details_sent: bool = False
    aborted: bool = False
    # async scheduling: (step, index) of this sequence's newest sampled id while it is still on the device only
    # (the step is in flight); `tokens` gets it when the step is read back
    pending: tuple[int, int] | None = None

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> GenerationParams:
        return self.request.params

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.generated)

    @property
    def num_tokens(self) -> int:
        """`tokens` and the sampled id still in flight."""
        return len(self.tokens) + (self.pending is not None)

    @property
    def to_compute(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def encoder_length(self) -> int:
        return len(self.encoder_ids or ())

    @property
    def wants_input_details(self) -> bool:
        return self.params.input_tokens and not self.input_details_sent

    @property
    def prefix_cacheable(self) -> bool:
        """Input-token details need logits at every prompt position, so such a request computes them all; a prompt
        prefix without a name (built in code, not from the store) cannot be told apart from another one."""
        prefix = self.request.prefix
        return not self.wants_input_details and self.encoder_ids is None and (prefix is None or bool(prefix.name))

    @property
    def cache_salt(self) -> tuple:
        """Cached KV is only shared between sequences with the same prompt prefix and adapter."""
        prefix, lora = self.request.prefix, self.request.lora
        return (None if prefix is None else prefix.name, None if lora is None else lora.name)

    def append(self, token: int) -> None:
        self.generated.append(token)
        self.tokens.append(token)

    def deadline_passed(self, now: float) -> bool:
        return self.params.deadline is not None and now >= self.params.deadline


def new_sequence(request: EngineRequest, stream: DecodeStream, generator: torch.Generator | None,
                 start_id: int | None) -> Sequence:
    """The sequence of `request`: decoder-only models cache prompt + generated, encoder-decoder models encode the
    prompt once and cache decoder start + generated. Prompt-prefix positions are placeholder ids (what input-token
    details show); the runner writes the prefix's embeddings over them."""
    prefix = request.prefix

    def placeholders(length: int) -> list[int]:
        return [prefix.placeholder_id] * length if length else []

    if start_id is None:
        tokens = placeholders(prefix.decoder_length if prefix else 0) + list(request.input_ids)
        return Sequence(request, stream, generator, tokens, prompt_length=len(tokens))
    return Sequence(request, stream, generator, placeholders(prefix.decoder_length if prefix else 0) + [start_id],
                    encoder_ids=placeholders(prefix.encoder_length if prefix else 0) + list(request.input_ids))

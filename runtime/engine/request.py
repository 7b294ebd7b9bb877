"""The engine's message types: what a front end submits and what it gets back.

These are plain, picklable dataclasses so the engine loop can move from a thread to its own process without the
front ends changing. The semantics follow TGIS (spec §1.4–§1.11): parameters arrive already converted to their
effective values (greedy ⇔ temperature 0, max_new_tokens defaulted and possibly clamped to the sequence length).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from runtime.engine.guided_spec import GuidedSpec
from runtime.engine.lora import LoraRef
from runtime.models.prefixes import PromptPrefix


class StopReason(enum.IntEnum):
    """Same numbering as `fmaas.StopReason`."""

    NOT_FINISHED = 0
    MAX_TOKENS = 1
    EOS_TOKEN = 2
    CANCELLED = 3
    TIME_LIMIT = 4
    STOP_SEQUENCE = 5
    TOKEN_LIMIT = 6
    ERROR = 7


@dataclass
class GenerationParams:
    """Effective per-request generation parameters (after TGIS defaulting, before nothing else)."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    # True when max_new_tokens was clamped to max_sequence_length - input: reaching it reports TOKEN_LIMIT
    max_is_token_limit: bool = False
    temperature: float = 0.0  # 0.0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    typical_p: float = 1.0  # <= 0 or >= 1 disables
    seed: int | None = None  # used only when sampling; the front end draws one when the client gave none
    repetition_penalty: float = 1.0
    length_penalty: tuple[int, float] | None = None  # (start_index, decay_factor)
    stop_sequences: list[str] = field(default_factory=list)
    include_stop_sequence: bool = True
    guided: GuidedSpec | None = None  # structured output; the front end has already compiled it once (valid)
    deadline: float | None = None  # time.monotonic() value; None means no time limit
    # response options
    generated_tokens: bool = False
    input_tokens: bool = False
    token_logprobs: bool = False
    token_ranks: bool = False
    top_n_tokens: int = 0
    # streaming front ends hold back trailing bytes that could still become a stop sequence (spec §3.3)
    stream: bool = False

    @property
    def sampling(self) -> bool:
        return self.temperature != 0.0


@dataclass
class EngineRequest:
    """One input sequence. `input_ids` are final: tokenized, truncated (left) and BOS-substituted."""

    request_id: str
    input_ids: list[int]
    params: GenerationParams
    prefix: PromptPrefix | None = None  # prompt-tuning virtual tokens (prefix_id), looked up by the front end
    lora: LoraRef | None = None  # LoRA adapter (adapter_id), loaded by the engine


@dataclass
class TopToken:
    token_id: int
    logprob: float | None = None


@dataclass
class TokenDetail:
    """Per-position token information (spec §1.9). None fields were not requested / not applicable."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_tokens: list[TopToken] | None = None


@dataclass
class RequestOutput:
    """One message of a request's output stream.

    A running request yields one output per generated token (possibly with empty `text` while bytes are held back);
    the last one has `finished=True`. `text` is the newly releasable delta; `output_text` on the final message is the
    full generated text (what a unary response returns).
    """

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    generated_token_count: int = 0
    tokens: list[TokenDetail] = field(default_factory=list)
    input_tokens: list[TokenDetail] | None = None  # sent once, with the first output, when requested
    finished: bool = False
    stop_reason: StopReason = StopReason.NOT_FINISHED
    stop_sequence: str | None = None
    output_text: str | None = None  # final message only
    error: str | None = None  # set (with finished=True, stop_reason ERROR) when the request failed
    error_stage: str = "generation"  # "generation" | "detokenization": TGIS words the two failures differently
    queue_time: float = 0.0  # seconds spent waiting before the first forward pass (final message)
    inference_time: float = 0.0  # seconds from batch entry to finish (final message)

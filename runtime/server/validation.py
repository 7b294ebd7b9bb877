"""TGIS request semantics before anything is queued: proto → effective parameters (spec §1.4), the validation
checks in TGIS order with TGIS messages (§1.5), length accounting and max_new_tokens clamping (§1.6), seeds (§1.7),
and the few limits this server adds to TGIS' (an empty input, a top_n_tokens cap; docs/ARCHITECTURE.md).

Pure functions over protobuf messages and `GenerationParams`, so every message can be unit-tested without a server.
"""

from __future__ import annotations

import dataclasses
import random

from proto import generation_pb2 as pb
from runtime.engine.request import GenerationParams

DEFAULT_MAX_NEW_TOKENS = 20
MAX_STOP_SEQUENCES = 6
MAX_STOP_SEQUENCE_BYTES = 240
I32_MAX = 2**31 - 1
STOP_SEQUENCES_MESSAGE = (f"can specify at most {MAX_STOP_SEQUENCES} non-empty stop sequences, each not more than "
                          f"{MAX_STOP_SEQUENCE_BYTES} UTF8 bytes")
EMPTY_INPUT_MESSAGE = "input text produced no tokens (this model's tokenizer adds no BOS token): send a non-empty text"


class ValidationError(ValueError):
    """Answered as INVALID_ARGUMENT with exactly this message (and counted as err="validation")."""


def convert_params(request_params: pb.Parameters | None, default_include_stop: bool, now: float) -> GenerationParams:
    """TGIS `convert_params`: effective defaults. `now` is time.monotonic() at conversion: the time limit counts
    from here, so validation and queueing time count against it."""
    if request_params is None:
        return GenerationParams(include_stop_sequence=False)
    p = request_params
    gp = GenerationParams()
    r = p.response
    gp.generated_tokens, gp.input_tokens = r.generated_tokens, r.input_tokens
    gp.token_logprobs, gp.token_ranks, gp.top_n_tokens = r.token_logprobs, r.token_ranks, r.top_n_tokens
    if p.decoding.repetition_penalty != 0.0:
        gp.repetition_penalty = p.decoding.repetition_penalty
    if p.decoding.HasField("length_penalty"):
        lp = p.decoding.length_penalty
        gp.length_penalty = (lp.start_index, lp.decay_factor)
    s = p.stopping
    if s.max_new_tokens != 0:
        gp.max_new_tokens = s.max_new_tokens
    gp.min_new_tokens = s.min_new_tokens
    gp.stop_sequences = list(s.stop_sequences)
    gp.include_stop_sequence = s.include_stop_sequence if s.HasField("include_stop_sequence") else default_include_stop
    if s.time_limit_millis > 0:
        gp.deadline = now + s.time_limit_millis / 1000
    if p.method == pb.SAMPLE:
        _convert_sampling(p, gp)
    return gp


def _convert_sampling(p: pb.Parameters, gp: GenerationParams) -> None:
    """Sample mode: temperature unset or 0 means 1.0 on a TGIS client (proto3 drops 0); an explicit 0.0 from a client
    of the superset proto (optional temperature, spec §7) means greedy."""
    gp.temperature = 1.0
    if not p.HasField("sampling"):
        return
    sp = p.sampling
    if sp.HasField("temperature"):
        gp.temperature = sp.temperature
    gp.top_k = sp.top_k
    if sp.HasField("seed"):
        gp.seed = sp.seed
    if sp.top_p != 0.0:
        gp.top_p = sp.top_p
    if sp.typical_p != 0.0:
        gp.typical_p = sp.typical_p


def validate_params(gp: GenerationParams, server_max_new_tokens: int) -> None:
    """The per-RPC checks #1–#11 of spec §1.5, first failure wins."""
    if gp.temperature != 0.0 and gp.temperature < 0.05:
        raise ValidationError("temperature must be >= 0.05")
    if gp.top_p <= 0.0 or gp.top_p > 1.0:
        raise ValidationError("top_p must be > 0.0 and <= 1.0")
    if gp.typical_p > 1.0:
        raise ValidationError("typical_p must be <= 1.0")
    if gp.top_k > I32_MAX:  # a uint32 that TGIS reads as a negative i32
        raise ValidationError("top_k must be strictly positive")
    if gp.max_new_tokens > server_max_new_tokens:
        raise ValidationError(f"max_new_tokens must be <= {server_max_new_tokens}")
    if gp.min_new_tokens > gp.max_new_tokens:
        raise ValidationError("min_new_tokens must be <= max_new_tokens")
    if gp.repetition_penalty <= 0.0:
        raise ValidationError("repetition_penalty must be > 0.0")
    if gp.length_penalty is not None and not 1.0 <= gp.length_penalty[1] <= 10.0:
        raise ValidationError("length_penalty must be >= 1.0 and <= 10.0")
    if len(gp.stop_sequences) > MAX_STOP_SEQUENCES:
        raise ValidationError(STOP_SEQUENCES_MESSAGE)
    if (gp.token_logprobs or gp.token_ranks or gp.top_n_tokens) and not (gp.input_tokens or gp.generated_tokens):
        raise ValidationError("must request input and/or generated tokens to request extra token detail")
    if any(not s or len(s.encode()) > MAX_STOP_SEQUENCE_BYTES for s in gp.stop_sequences):
        raise ValidationError(STOP_SEQUENCES_MESSAGE)


def check_length(gp: GenerationParams, input_length: int, max_sequence_length: int,
                 prefix_length: int = 0) -> GenerationParams:
    """Checks #14/#15 for one input, then TGIS' silent clamp: an output that would not fit gets
    max_new_tokens = S - (input + prefix), and reaching it reports TOKEN_LIMIT. Before them, an input with no
    position at all (empty text, a tokenizer without BOS, no prefix) is refused: there is nothing to generate from
    (TGIS' shard fails such a request with a tensor-shape error)."""
    used = input_length + prefix_length
    if used == 0:
        raise ValidationError(EMPTY_INPUT_MESSAGE)
    if used >= max_sequence_length:
        raise ValidationError(f"input tokens ({input_length}) plus prefix length ({prefix_length}) must be < "
                              f"{max_sequence_length}")
    if used + gp.min_new_tokens > max_sequence_length:
        raise ValidationError(f"input tokens ({input_length}) plus prefix length ({prefix_length}) plus "
                              f"min_new_tokens ({gp.min_new_tokens}) must be <= {max_sequence_length}")
    if used + gp.max_new_tokens > max_sequence_length:
        return dataclasses.replace(gp, max_new_tokens=max_sequence_length - used, max_is_token_limit=True)
    return gp


def check_server_limits(gp: GenerationParams, max_top_n_tokens: int | None) -> None:
    """Bounds TGIS does not have, checked after all of TGIS' checks: TGIS clamps top_n_tokens only to the vocabulary,
    so one request could ask for every token's logprob at every position (tens of megabytes per response)."""
    if max_top_n_tokens is not None and gp.top_n_tokens > max_top_n_tokens:
        raise ValidationError(f"top_n_tokens ({gp.top_n_tokens}) must be <= {max_top_n_tokens}")


def with_seed(gp: GenerationParams, rng: random.Random) -> GenerationParams:
    """A sampling request without a client seed gets its own random u32 (so batch inputs differ); greedy: none."""
    if gp.sampling and gp.seed is None:
        return dataclasses.replace(gp, seed=rng.getrandbits(32))
    return gp

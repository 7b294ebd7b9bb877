"""An independent reading of the spec's request rules (tgis-behavior.md §1.4-§1.6, §5.4), for fuzz tests.

Written from the spec text, not from runtime/server/validation.py, so the two can disagree: the fuzz test compares
the real server against this. `verdict()` gives what TGIS answers a Generate/GenerateStream request with: None (it
is served) or (status, message); message None means the spec has no wording for the case (our extensions); GUIDED
means served or refused with any INVALID_ARGUMENT (guided decoding is no TGIS feature: its checks are this server's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import grpc

from proto import generation_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
STOP_MESSAGE = "can specify at most 6 non-empty stop sequences, each not more than 240 UTF8 bytes"
ID_PATTERN = r"[/\w\-]+"
GUIDED = "served, or INVALID_ARGUMENT with this server's own message"


@dataclass
class Effective:
    """§1.4's effective parameters."""

    sampling: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    length_penalty: tuple[int, float] | None = None
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    stop_sequences: list[str] = field(default_factory=list)
    details: bool = False  # token_logprobs / token_ranks / top_n_tokens asked for
    tokens: bool = False  # input_tokens / generated_tokens asked for
    top_n_tokens: int = 0


@dataclass
class Store:
    """What the fuzzed server's prefix store holds: id -> prefix length, and ids with a fixed failure message."""

    prefixes: dict[str, int]
    loras: set[str]
    failures: dict[str, str]  # id -> the server's full message (our extensions and TGIS' shard texts)


def effective(request) -> Effective:
    e = Effective()
    if not request.HasField("params"):
        return e
    p = request.params
    r = p.response
    e.details = bool(r.token_logprobs or r.token_ranks or r.top_n_tokens)
    e.tokens = bool(r.input_tokens or r.generated_tokens)
    e.top_n_tokens = r.top_n_tokens
    if p.decoding.repetition_penalty != 0.0:
        e.repetition_penalty = p.decoding.repetition_penalty
    if p.decoding.HasField("length_penalty"):
        e.length_penalty = (p.decoding.length_penalty.start_index, p.decoding.length_penalty.decay_factor)
    if p.stopping.max_new_tokens:
        e.max_new_tokens = p.stopping.max_new_tokens
    e.min_new_tokens = p.stopping.min_new_tokens
    e.stop_sequences = list(p.stopping.stop_sequences)
    if p.method == pb.SAMPLE:
        s = p.sampling
        # the superset proto's explicit temperature 0.0 means greedy (spec §7); unset or absent means 1.0
        explicit_zero = s.HasField("temperature") and s.temperature == 0.0
        e.sampling = not explicit_zero
        e.temperature = 0.0 if explicit_zero else (s.temperature or 1.0)
        e.top_k, e.seed = s.top_k, s.seed if s.HasField("seed") else None
        if s.top_p != 0.0:
            e.top_p = s.top_p
        if s.typical_p != 0.0:
            e.typical_p = s.typical_p
    return e


def parameter_failure(e: Effective, server_max_new: int) -> str | None:
    """Checks #1-#11 in order (the first failing one's message)."""
    top_k_i32 = e.top_k - 2**32 if e.top_k > 2**31 - 1 else e.top_k
    checks = [
        (e.temperature != 0 and e.temperature < 0.05, "temperature must be >= 0.05"),
        (e.top_p <= 0.0 or e.top_p > 1.0, "top_p must be > 0.0 and <= 1.0"),
        (e.typical_p > 1.0, "typical_p must be <= 1.0"),
        (top_k_i32 < 0, "top_k must be strictly positive"),
        (e.max_new_tokens > server_max_new, f"max_new_tokens must be <= {server_max_new}"),
        (e.min_new_tokens > e.max_new_tokens, "min_new_tokens must be <= max_new_tokens"),
        (e.repetition_penalty <= 0.0, "repetition_penalty must be > 0.0"),
        (e.length_penalty is not None and not (1.0 <= e.length_penalty[1] <= 10.0),
         "length_penalty must be >= 1.0 and <= 10.0"),
        (len(e.stop_sequences) > 6, STOP_MESSAGE),
        (e.details and not e.tokens, "must request input and/or generated tokens to request extra token detail"),
        (any(not s or len(s.encode()) > 240 for s in e.stop_sequences), STOP_MESSAGE),
    ]
    return next((message for failed, message in checks if failed), None)


def prefix_lookup(prefix_id: str, store: Store) -> tuple[int, str | None]:
    """Check #12: (prefix length, failure message or None)."""
    if not prefix_id or prefix_id in store.loras:
        return 0, None
    if prefix_id in store.prefixes:
        return store.prefixes[prefix_id], None
    if prefix_id in store.failures:
        return 0, store.failures[prefix_id]
    lead = f"can't retrieve prompt prefix with id '{prefix_id}': "
    if not re.fullmatch(ID_PATTERN, prefix_id):
        return 0, (lead + f"Unexpected <class 'Exception'>: Invalid prefix id {prefix_id}, must contain only "
                   "alphanumeric, _ and - and /")
    if prefix_id.startswith("/"):  # joined to the store's path it leaves the store
        return 0, lead + f"Unexpected <class 'Exception'>: Invalid prefix id {prefix_id}"
    return 0, lead + f'prefix id "{prefix_id}" not found'


def input_length(tokenizer, text: str, truncate: int) -> int:
    """§1.6: counted with special tokens; T > 0 below the length truncates to T."""
    n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
    return truncate if 0 < truncate < n else n


def length_failure(n: int, prefix: int, e: Effective, s: int) -> str | None:
    """Checks #14/#15 for one input."""
    if n + prefix >= s:
        return f"input tokens ({n}) plus prefix length ({prefix}) must be < {s}"
    if n + prefix + e.min_new_tokens > s:
        return (f"input tokens ({n}) plus prefix length ({prefix}) plus min_new_tokens ({e.min_new_tokens}) must "
                f"be <= {s}")
    return None


def verdict(request, texts: list[str], tokenizer, store: Store, s: int, server_max_new: int,
            max_top_n: int) -> tuple[grpc.StatusCode, str | None] | str | None:
    """TGIS' answer to a Generate (or, with one text, GenerateStream) request; None when it is served."""
    e = effective(request)
    failure = parameter_failure(e, server_max_new)
    if failure:
        return INVALID, failure
    if request.HasField("params") and request.params.decoding.WhichOneof("guided"):
        return GUIDED
    prefix, failure = prefix_lookup(request.adapter_id or request.prefix_id, store)
    if failure:
        return INVALID, failure
    truncate = request.params.truncate_input_tokens
    for text in texts:
        failure = length_failure(input_length(tokenizer, text, truncate), prefix, e, s)
        if failure:
            return INVALID, failure
    if e.top_n_tokens > max_top_n:
        return INVALID, f"top_n_tokens ({e.top_n_tokens}) must be <= {max_top_n}"
    return None


def max_tokens(n: int, prefix: int, e: Effective, s: int) -> int:
    """§1.6's silent clamp: what a served input may generate at most."""
    return min(e.max_new_tokens, s - n - prefix)


def top_n_bound(e: Effective, vocab: int) -> int:
    """§1.9: at most 4·min(n, vocab) top tokens per position."""
    return 4 * min(e.top_n_tokens, vocab)

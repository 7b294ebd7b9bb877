"""Token ids → text exactly as the TGIS router produces it (spec §3.1–§3.3).

TGIS decodes on the router with the Rust `tokenizers` library, so we call the backend tokenizer directly (never
transformers' Python `decode`, which may clean up spaces). Two paths:

* `decode_full`: the whole-sequence decode used for unary responses without stop sequences (§3.2).
* `IncrementalDetokenizer`: one token at a time, for streaming and for stop-sequence matching (§3.3). It only ever
  releases text that cannot change or be cut later: no partial UTF-8, no split grapheme cluster, and with a
  hold-back h the bytes a stop sequence could still truncate.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import regex

REPLACEMENT = "\ufffd"
_GRAPHEME = regex.compile(r"\X")


class DetokenizationError(Exception):
    """Surfaced to clients as `Request failed during detokenization: {message}`."""


class DecoderKind(Enum):
    """The `tokenizer.json` decoder types TGIS distinguishes (names as in the Rust `DecoderWrapper`)."""

    BYTE_LEVEL = "ByteLevel"
    SEQUENCE = "Sequence"  # TGIS assumes a Sequence decoder is Llama's: byte-fallback + metaspace-like first token
    BPE = "BPEDecoder"
    CTC = "CTC"
    METASPACE = "Metaspace"
    WORDPIECE = "WordPiece"
    NONE = "none"
    UNSUPPORTED = "unsupported"


def classify_decoder(decoder: object | None) -> DecoderKind:
    if decoder is None:
        return DecoderKind.NONE
    name = type(decoder).__name__
    return next((k for k in DecoderKind if k.value == name), DecoderKind.UNSUPPORTED)


@dataclass(frozen=True)
class TokenizerInfo:
    """Everything the text side needs from the tokenizer, built once per engine (§3.1)."""

    backend: object  # tokenizers.Tokenizer (the Rust tokenizer TGIS' router uses)
    kind: DecoderKind
    decoder_repr: str
    seq2seq: bool
    skip_special_tokens: bool
    eos_token_id: int | None
    placeholder_id: int
    placeholder_text: str
    skipped_ids: frozenset[int]  # special tokens left out of decodes (none when output_special_tokens)

    @classmethod
    def from_tokenizer(cls, tokenizer, seq2seq: bool, output_special_tokens: bool = False,
                       eos_token_id: int | None = None) -> TokenizerInfo:
        """`tokenizer` is a HF fast tokenizer; `eos_token_id` is the model's (falls back to the tokenizer's)."""
        backend = tokenizer.backend_tokenizer
        decoder = backend.decoder
        placeholder = backend.encode("A", add_special_tokens=False).ids[0]
        specials = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        return cls(
            backend=backend,
            kind=classify_decoder(decoder),
            decoder_repr=str(decoder),
            seq2seq=seq2seq,
            skip_special_tokens=not output_special_tokens,
            eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
            placeholder_id=placeholder,
            placeholder_text=backend.decode([placeholder], skip_special_tokens=False),
            skipped_ids=frozenset() if output_special_tokens else specials,
        )


def _raw(info: TokenizerInfo, ids: list[int]) -> str:
    """TGIS' "full decode": a trailing EOS is dropped when special tokens are kept, so EOS text never shows."""
    if not info.skip_special_tokens and ids and ids[-1] == info.eos_token_id:
        ids = ids[:-1]
    return info.backend.decode(ids, skip_special_tokens=info.skip_special_tokens)


def _after_placeholder(info: TokenizerInfo, ids: list[int]) -> str:
    """Decode as a continuation: put the placeholder first so the decoder's first-token rule (strip the leading
    space) hits the placeholder instead of our first token, then cut the placeholder's text off."""
    text = _raw(info, [info.placeholder_id, *ids])
    if not text.startswith(info.placeholder_text):
        raise DetokenizationError("Unexpected")
    return text[len(info.placeholder_text):]


def decode(info: TokenizerInfo, ids: list[int], first: bool, last: bool) -> str:
    """The router's `decode(ids, first, last)`: `first` = these ids start the output of a seq2seq model,
    `last` = nothing follows them (only BPE cares). Trailing U+FFFD (an incomplete character) is dropped."""
    kind = info.kind
    if (first and info.seq2seq) or (last and kind is DecoderKind.BPE) or kind in (DecoderKind.BYTE_LEVEL,
                                                                                  DecoderKind.CTC):
        return _raw(info, ids).rstrip(REPLACEMENT)
    if kind in (DecoderKind.METASPACE, DecoderKind.WORDPIECE, DecoderKind.SEQUENCE):
        return _after_placeholder(info, ids).rstrip(REPLACEMENT)
    if kind is DecoderKind.BPE:
        # the BPE decoder turns the end-of-word suffix into a space except on the last token: append a placeholder
        text = _raw(info, [*ids, info.placeholder_id])
        if not text.endswith(info.placeholder_text):
            raise DetokenizationError("Unexpected")
        return text[: len(text) - len(info.placeholder_text)]
    if kind is DecoderKind.NONE:
        return " " + _raw(info, ids)  # without a decoder tokens are joined by spaces; this one joins us to the prompt
    raise DetokenizationError(f"Unsupported tokenizer type: {info.decoder_repr}")


def decode_full(info: TokenizerInfo, ids: list[int]) -> str:
    """Whole-sequence decode of all generated ids (§3.2): the unary text when there are no stop sequences."""
    return decode(info, ids, first=True, last=True)


# ---- incremental decoding: token pieces ------------------------------------------------------------------------

class _Buffered:
    """ByteLevel / Sequence: decode the ids since the last complete decode together, so a character split over
    several byte tokens is appended only once all its bytes are there (a trailing U+FFFD means "not yet")."""

    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.ids: list[int] = []
        self.first = info.seq2seq  # as in _FirstDiff, for the Sequence decoder's first-token rule

    def _decode(self) -> str:
        if self.info.kind is DecoderKind.SEQUENCE and not self.first:
            return _after_placeholder(self.info, self.ids)
        return _raw(self.info, self.ids)

    def step(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode()
        if text.endswith(REPLACEMENT):
            return ""
        self.first = self.first and all(i in self.info.skipped_ids for i in self.ids)
        self.ids.clear()
        return text

    def flush(self) -> str:
        text = self._decode().rstrip(REPLACEMENT) if self.ids else ""
        self.ids.clear()
        return text


class _LastDiff:
    """BPE decoder: a token's text depends on whether it is the last one, so each is emitted one step late."""

    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.pending: int | None = None

    def step(self, token: int) -> str:
        text = "" if self.pending is None else decode(self.info, [self.pending], first=False, last=False)
        self.pending = token
        return text

    def flush(self) -> str:
        text = "" if self.pending is None else _raw(self.info, [self.pending])
        self.pending = None
        return text


class _DeDup:
    """CTC decoder: a repeated id is the same frame, so it adds nothing."""

    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.last: int | None = None

    def step(self, token: int) -> str:
        if token == self.last:
            return ""
        self.last = token
        return _raw(self.info, [token])

    def flush(self) -> str:
        return ""


class _FirstDiff:
    """Metaspace / WordPiece / no decoder: every token decodes on its own as a continuation, except a seq2seq
    model's first token, which the whole-sequence decode treats as the start. Special tokens skipped by the decode
    do not count as that first token (TGIS clears the flag on any token; we keep stream and unary text equal)."""

    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.first = info.seq2seq

    def step(self, token: int) -> str:
        text = decode(self.info, [token], first=self.first, last=False)
        self.first = self.first and token in self.info.skipped_ids
        return text

    def flush(self) -> str:
        return ""


def _pieces(info: TokenizerInfo) -> _Buffered | _LastDiff | _DeDup | _FirstDiff:
    if info.kind in (DecoderKind.BYTE_LEVEL, DecoderKind.SEQUENCE):
        return _Buffered(info)
    if info.kind is DecoderKind.BPE:
        return _LastDiff(info)
    if info.kind is DecoderKind.CTC:
        return _DeDup(info)
    return _FirstDiff(info)


# ---- incremental decoding: output and release ------------------------------------------------------------------

class IncrementalDetokenizer:
    """Accumulates the decoded output (as text and as bytes, since stop sequences are matched bytewise) and decides
    how much of it may be released to a stream.

    Release rule (all decoder kinds; TGIS applies the grapheme rule to ByteLevel/Sequence and token boundaries to the
    others, we use the stricter grapheme rule everywhere, which only changes how the same text is split): never
    release the last grapheme cluster (a combining mark or emoji modifier may still extend it); with hold-back h > 0
    release at most up to output_len − (h + bytes just added), so the text of the newest token and the h bytes before
    it stay unsent until stop-sequence matching had its chance to truncate them.
    """

    def __init__(self, info: TokenizerInfo, hold_back: int = 0):
        self.pieces = _pieces(info)
        self.hold_back = hold_back
        self.output = bytearray()
        self.released = 0  # bytes of `output` already handed out

    def next(self, token: int) -> tuple[str, int]:
        """Feed one token; return (releasable text, number of bytes appended to the output)."""
        added = self.pieces.step(token).encode()
        self.output += added
        limit = len(self.output) - (self.hold_back + len(added) if self.hold_back else 0)
        return self._release(limit), len(added)

    def _release(self, limit: int) -> str:
        """Release up to the last grapheme-cluster start at or before byte offset `limit`."""
        if limit <= self.released:
            return ""
        pending = self.output[self.released:].decode()
        cut, offset = 0, self.released
        for m in _GRAPHEME.finditer(pending):
            if offset > limit:
                break
            cut = m.start()
            offset += len(m.group().encode())
        # `cut` is the start of the last cluster beginning at or before `limit`; it is never the end of the output
        text = pending[:cut]
        self.released += len(text.encode())
        return text

    def flush(self, max_len: int | None = None) -> str:
        """Append what the decoder still holds, truncate the output to `max_len` bytes if given, release the rest."""
        self.output += self.pieces.flush().encode()
        if max_len is not None:
            del self.output[max_len:]
        text = self.output[self.released:].decode()
        self.released = len(self.output)
        return text

    @property
    def text(self) -> str:
        return self.output.decode()

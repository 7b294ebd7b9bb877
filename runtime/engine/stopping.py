"""Per-request text state: incremental detokenization plus bytewise stop-sequence matching (spec §3.3, §3.4).

The engine feeds every generated token except a final EOS, asks `match_stop` when stop checks apply (§1.11) and
calls `finish` once. Unary requests release no text before `finish`, so for every request the deltas returned by
`add` and `finish` concatenate to the final `text`.
"""

from __future__ import annotations

from runtime.engine.detokenizer import IncrementalDetokenizer, TokenizerInfo, decode_full


def hold_back(stop_sequences: list[str], include_stop_sequence: bool, stream: bool) -> int:
    """Bytes a stream keeps unsent so a stop sequence can still be trimmed (§3.3)."""
    if not stream or not stop_sequences:
        return 0
    return 1 if include_stop_sequence else max(len(s.encode()) for s in stop_sequences)


class DecodeStream:
    """Per-request incremental detokenizer + stop-sequence matcher (spec §3.3, §3.4)."""

    def __init__(self, info: TokenizerInfo, stop_sequences: list[str], include_stop_sequence: bool, stream: bool):
        self.info = info
        self.stops = [(s, s.encode()) for s in stop_sequences]
        self.include_stop_sequence = include_stop_sequence
        self.stream = stream
        self.ids: list[int] = []  # kept only for the one-go decode
        # TGIS decodes a unary request without stop sequences in one go at the end (§3.2); the rest incrementally
        self.detok = (IncrementalDetokenizer(info, hold_back(stop_sequences, include_stop_sequence, stream))
                      if stream or stop_sequences else None)
        self.added = 0  # bytes the last `add` appended to the output
        self.match: tuple[str, int] | None = None  # (stop sequence, end of the kept output in bytes)
        self.final: str | None = None

    def add(self, token_id: int) -> str:
        """Feed one generated token (never the final EOS: the engine does not feed it); return newly releasable text."""
        if self.detok is None:
            self.ids.append(token_id)
            return ""
        text, self.added = self.detok.next(token_id)
        return text if self.stream else ""

    def match_stop(self) -> str | None:
        """The stop sequence matched by the bytes the last `add` appended (first in list order wins, its last
        occurrence in the window); None if none. The engine calls it only when stop checks apply (§1.11)."""
        if self.detok is None or not self.added:
            return None
        output = self.detok.output
        for stop, pattern in self.stops:
            start = output.rfind(pattern, max(0, len(output) - self.added - len(pattern) + 1))
            if start >= 0:
                self.match = (stop, start + len(pattern) if self.include_stop_sequence else start)
                return stop
        return None

    def finish(self, stop_sequence: str | None = None) -> str:
        """Flush at the end of generation; return the final text delta. When `stop_sequence` is the one
        `match_stop` returned, the output is truncated at it (kept iff include_stop_sequence)."""
        if self.detok is None:
            self.final = decode_full(self.info, self.ids)
            return self.final
        max_len = None
        if stop_sequence is not None:
            if self.match is None or self.match[0] != stop_sequence:
                raise ValueError(f"finish({stop_sequence!r}) without a matching match_stop()")
            max_len = self.match[1]
        rest = self.detok.flush(max_len)
        self.final = self.detok.text
        return rest if self.stream else self.final

    @property
    def text(self) -> str:
        """Full generated text so far; after finish(), the final unary text."""
        if self.final is not None:
            return self.final
        return self.detok.text if self.detok is not None else decode_full(self.info, self.ids)

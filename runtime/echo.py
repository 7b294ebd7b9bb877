"""Client values quoted in error messages, cut to a bounded length.

An id of thousands of characters echoed twice in one message would exceed gRPC's 8 KB metadata limit, and clients
would then see RESOURCE_EXHAUSTED instead of the INVALID_ARGUMENT meant for them. Values up to the limit are quoted
unchanged, so every spec message stays verbatim for ordinary ids.
"""

from __future__ import annotations

ECHO_LIMIT = 100


def echo(value: str, limit: int = ECHO_LIMIT) -> str:
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value)} characters)"

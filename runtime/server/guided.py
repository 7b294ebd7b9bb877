"""The proto's `oneof guided` → a checked, compiled-once `GuidedSpec`, or INVALID_ARGUMENT with the reason.

The front end compiles the spec (awaiting the compiler's thread pool, so other RPCs go on) before anything is
queued; the request then carries only the spec. The engine compiles it again from its own cache: shipping the
compiled grammar instead would cost more (measured for SmolLM2: a JSON schema compiles in ~10 ms but serializes to
~100 kB in ~20 ms and deserializes in ~5 ms, and that would cross the process pipe with every request).
"""

from __future__ import annotations

import asyncio

from proto import generation_pb2 as pb
from runtime.engine.guided import GrammarCompiler
from runtime.engine.guided_spec import GuidedSpec, GuidedSpecError, guided_spec
from runtime.server.validation import ValidationError


def proto_guided_spec(decoding: pb.DecodingParameters) -> GuidedSpec | None:
    """The request's spec (None: unguided, or format TEXT); the cheap checks only."""
    option = decoding.WhichOneof("guided")
    if option is None:
        return None
    if option == "format":
        formats = pb.DecodingParameters.ResponseFormat
        value = formats.Name(decoding.format) if decoding.format in formats.values() else str(decoding.format)
    elif option == "choice":
        value = list(decoding.choice.choices)
    else:
        value = getattr(decoding, option)
    try:
        return guided_spec(option, value)
    except GuidedSpecError as exc:
        raise ValidationError(str(exc)) from exc


async def check_compiles(compiler: GrammarCompiler, spec: GuidedSpec) -> None:
    try:
        # shielded: a client leaving must not cancel a compilation that the cache shares with other requests
        await asyncio.shield(asyncio.wrap_future(compiler.compile(spec)))
    except GuidedSpecError as exc:
        raise ValidationError(str(exc)) from exc

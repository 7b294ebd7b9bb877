"""The client logic every target shares: send the requests (bounded concurrency and/or timed arrivals), time them.

A target only turns requests into payloads and supplies `send(payload, record)`, which streams one request, sets
`record.prompt_tokens` and calls `record.tokens(n)` whenever the stream holds more generated tokens; it raises
`RequestFailed` for a request the server refused or failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


class RequestFailed(Exception):
    """One request ended in an error: `status` groups it in the report (a gRPC code, `HTTP 400`, `ERROR`)."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass
class RequestRecord:
    scheduled: float  # seconds after the run's start at which it was due to be sent
    start: float = 0.0  # perf_counter() values
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # one per streamed message that added tokens
    output_tokens: int = 0
    prompt_tokens: int = 0  # as the server counted them when it says, else as sent
    error: str | None = None  # RequestFailed.status
    message: str | None = None

    def tokens(self, count: int) -> None:
        """The stream now holds `count` generated tokens in all."""
        if count > self.output_tokens:
            self.token_times.append(time.perf_counter())
            self.output_tokens = count


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float


Send = Callable[[object, RequestRecord], Awaitable[None]]


async def run_requests(payloads: list, send: Send, concurrency: int | None, arrivals: list[float] | None = None,
                       on_done: Callable[[], None] = lambda: None) -> RunResult:
    """Send every request (each no earlier than its arrival time, at most `concurrency` in flight) and time it."""
    limit = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    records = [RequestRecord(arrivals[i] if arrivals else 0.0) for i in range(len(payloads))]
    t0 = time.perf_counter()

    async def one(payload, record: RequestRecord) -> None:
        await asyncio.sleep(max(0.0, t0 + record.scheduled - time.perf_counter()))
        async with limit:
            record.start = time.perf_counter()
            try:
                await send(payload, record)
            except RequestFailed as exc:
                record.error, record.message = exc.status, str(exc)
            record.end = time.perf_counter()
        on_done()

    await asyncio.gather(*(one(r, rec) for r, rec in zip(payloads, records, strict=True)))
    return RunResult(records, time.perf_counter() - t0)

"""asyncio front for the engine core: `async for output in engine.generate(request)`.

The core runs in its own thread and only exchanges messages with this wrapper: requests and aborts go in, lists of
outputs come back through one callback that hands each output to its request's asyncio queue on the loop that
asked for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from runtime.engine.config import EngineConfig
from runtime.engine.core import EngineCore, StepStats
from runtime.engine.request import EngineRequest, GenerationParams, RequestOutput
from runtime.models.loader import LoadedModel

__all__ = ["AsyncEngine", "StepStats"]


class AsyncEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.core = EngineCore(config, loaded)
        lm = self.core.loaded
        self.tokenizer = lm.tokenizer
        self.is_encoder_decoder = lm.is_encoder_decoder
        self.max_sequence_length = self.core.max_sequence_length
        self.eos_token_id = lm.eos_token_id
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self.core.emit = self._dispatch
        self._thread = threading.Thread(target=self.core.run, name="tgis-engine", daemon=True)
        self._thread.start()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Engine thread → the requests' queues: one wake-up per event loop per step, not one per output, so the
        loop thread does not fight the engine thread for the GIL once per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early aborts it in the engine at once."""
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"duplicate request id {request.request_id}")
            self._streams[request.request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            self.core.add(request)
            while not finished:
                out: RequestOutput = await q.get()
                finished = out.finished
                yield out
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.core.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    async def check_health(self) -> bool:
        """Cheap while the last step succeeded; after a failure, a real 1-token generation decides (TGIS §4.6)."""
        if self.core.healthy:
            return True
        ids = self.tokenizer("liveness")["input_ids"] or [self.core.loaded.pad_token_id]
        req = EngineRequest(f"health-{uuid.uuid4().hex}", ids, GenerationParams(max_new_tokens=1,
                            deadline=time.monotonic() + 60))
        async for out in self.generate(req):
            if out.finished:
                return out.error is None
        return False

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve at all (a tensor-parallel rank died), else None."""
        return self.core.runner.failure

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self.core.listeners.append(fn)

    def shutdown(self) -> None:
        self.core.shutdown()
        self._thread.join(timeout=30)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)

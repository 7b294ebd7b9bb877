"""asyncio front for the engine core: `async for output in engine.generate(request)`.

The core exchanges only messages with this wrapper: requests and aborts go in; lists of outputs and step statistics
come back and are handed to each request's asyncio queue on the loop that asked for it. Two placements share this
class: `AsyncEngine` runs the core in a thread of this process (tests, `tgis generate`, `tgis bench`: the model
object stays reachable), `ProcessEngine` (runtime/engine/process.py) runs it in its own process so that its
Python-heavy loop does not compete with the gRPC event loop for the GIL (`tgis serve`).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from runtime.engine.config import EngineConfig
from runtime.engine.core import EngineCore, StepStats
from runtime.engine.guided import GrammarCompiler
from runtime.engine.request import EngineRequest, GenerationParams, RequestOutput, StopReason
from runtime.models.loader import LoadedModel
from runtime.threads import claim_engine_cores

__all__ = ["AsyncEngine", "EngineFront", "ModelFacts", "StepStats"]


@dataclass(frozen=True)
class ModelFacts:
    """What front ends need to know about the served model (picklable: it crosses the process boundary)."""

    max_sequence_length: int
    is_encoder_decoder: bool
    eos_token_id: int | None
    pad_token_id: int
    embedding_dim: int | None  # None when the model exposes no input-embedding layer
    dtype: torch.dtype
    tensor_parallel_size: int
    vocab_size: int  # logits width (LM-head rows): guided-decoding masks are this wide

    @staticmethod
    def of(core: EngineCore) -> ModelFacts:
        lm = core.loaded
        try:
            dim = lm.model.get_input_embeddings().weight.shape[1]
        except (NotImplementedError, AttributeError):
            dim = None
        return ModelFacts(core.max_sequence_length, lm.is_encoder_decoder, lm.eos_token_id, lm.pad_token_id, dim,
                          lm.dtype, core.config.tensor_parallel_size, lm.vocab_size)


class EngineFront:
    """Request streams over an engine core reached through `_submit` / `_abort`; subclasses place the core."""

    def __init__(self, facts: ModelFacts, tokenizer, grammars: GrammarCompiler | None = None):
        """`grammars`: the engine's own compiler when it lives in this process (its cache then serves both)."""
        self.facts = facts
        self.tokenizer = tokenizer
        # front ends compile a guided request's spec once to validate it before submitting it
        self.grammars = grammars or GrammarCompiler(tokenizer, facts.vocab_size, facts.eos_token_id)
        self.is_encoder_decoder = facts.is_encoder_decoder
        self.max_sequence_length = facts.max_sequence_length
        self.eos_token_id = facts.eos_token_id
        self._healthy = True
        self.listeners: list[Callable[[StepStats], None]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()

    # ---- placement-specific -------------------------------------------------------------------------------
    def _submit(self, request: EngineRequest) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve at all (its process or a tensor-parallel rank died), else None."""
        raise NotImplementedError

    @property
    def healthy(self) -> bool:
        """False after a failed step, until a step succeeds."""
        return self._healthy

    def shutdown(self) -> None:
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Engine side → the requests' queues: one wake-up per event loop per step, not one per output, so the
        loop thread does not fight the engine for the GIL once per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _fail_streams(self, error: str, request_ids: list[str] | None = None) -> None:
        """End open streams (all, or these) with an error: the engine that would answer them is gone."""
        with self._lock:
            ids = list(self._streams) if request_ids is None else request_ids
        self._dispatch([RequestOutput(i, finished=True, stop_reason=StopReason.ERROR, error=error) for i in ids])

    def _on_step(self, stats: StepStats, healthy: bool) -> None:
        self._healthy = healthy
        for fn in self.listeners:
            fn(stats)

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self.listeners.append(fn)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early aborts it in the engine at once."""
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"duplicate request id {request.request_id}")
            self._streams[request.request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            self._submit(request)
            while not finished:
                out: RequestOutput = await q.get()
                finished = out.finished
                yield out
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    async def check_health(self) -> bool:
        """Cheap while the last step succeeded; after a failure, a real 1-token generation decides (TGIS §4.6)."""
        if self.healthy:
            return True
        ids = self.tokenizer("liveness")["input_ids"] or [self.facts.pad_token_id]
        req = EngineRequest(f"health-{uuid.uuid4().hex}", ids, GenerationParams(max_new_tokens=1,
                            deadline=time.monotonic() + 60))
        async for out in self.generate(req):
            if out.finished:
                return out.error is None
        return False


class AsyncEngine(EngineFront):
    """The core in a thread of this process; `self.core` (and its model) stays reachable."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        # the caller's event loop (a benchmark client, the terminal) runs beside the engine thread: as in the
        # engine process, torch gets the cores the front end leaves (oversubscribed OpenMP threads spin against
        # each other: a batch-16 decode matmul ran 7x slower with 2 threads than with 1 on a busy 2-core machine)
        claim_engine_cores(config.tensor_parallel_size)
        self.core = EngineCore(config, loaded)
        super().__init__(ModelFacts.of(self.core), self.core.loaded.tokenizer, self.core.grammars)
        self.core.emit = self._dispatch
        self.core.listeners.append(lambda stats: self._on_step(stats, self.core.healthy))
        self._thread = threading.Thread(target=self.core.run, name="tgis-engine", daemon=True)
        self._thread.start()

    def _submit(self, request: EngineRequest) -> None:
        self.core.add(request)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    @property
    def failure(self) -> str | None:
        return self.core.runner.failure

    @property
    def healthy(self) -> bool:
        return self.core.healthy

    def shutdown(self) -> None:
        self.core.shutdown()
        self._thread.join(timeout=30)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)

"""The engine core in its own process (vLLM v1 style), for `tgis serve`.

Why: the core's loop is Python-heavy (eager transformers forwards, sampling, detokenization) and, run as a thread,
it shares the GIL with the gRPC event loop; on an H100 that cost ~20 % of throughput (docs/benchmarks.md). Here the
core runs unchanged in a spawned process: requests and aborts travel over a multiprocessing queue (the core reads it
as its inbox), and one pipe carries back, in order, output lists, step statistics with the health flag, and a
terminal failure (a dead tensor-parallel rank). If the engine process itself dies, the pipe closes and the front
end reports the failure, so the server stops instead of hanging.

The process sizes torch's intra-op pool to the cores it really has, less one for the front end (runtime/threads.py;
OMP_NUM_THREADS overrides). At shutdown every request still open is aborted first (nobody waits for it any more) and
the process gets a bounded time to exit before it is killed.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch

from runtime.engine.async_engine import EngineFront, ModelFacts
from runtime.engine.config import EngineConfig
from runtime.engine.core import Abort, EngineCore, Shutdown
from runtime.engine.request import EngineRequest
from runtime.threads import available_cores, claim_engine_cores

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0
POLL_S = 0.5
SHUTDOWN_TIMEOUT_S = 15.0


class EngineStartError(ValueError):
    """The engine process could not load the model; the message is the original error's."""


def freeze_loaded_objects() -> None:
    """Move everything loaded so far (torch, transformers, the model, the tokenizer: it lives as long as the
    process) out of the garbage collector's sight. Otherwise a full collection in the middle of serving walks all of
    it while every stream waits: 228 ms for SmolLM2's engine on the 2-core CPUs (370k objects), microseconds after."""
    gc.collect()
    gc.freeze()


def _engine_main(config: EngineConfig, inbox, out: Connection, setup_logging: Callable[[], None] | None,
                 log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process coordinates shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger().setLevel(log_level)
    if setup_logging is not None:
        setup_logging()
    threads = claim_engine_cores(config.tensor_parallel_size)
    log.info("engine process: %d torch thread(s) of %d available core(s) (OMP_NUM_THREADS overrides)", threads,
             available_cores())
    if config.cuda_memory_fraction < 1.0 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(config.cuda_memory_fraction)
    lock = threading.Lock()

    def send(*msg) -> None:
        with lock:
            out.send(msg)

    try:
        core = EngineCore(config)
    except Exception as exc:  # noqa: BLE001 - reported to the server process, which fails its start with it
        send("error", str(exc) or type(exc).__name__)
        return
    freeze_loaded_objects()
    core.inbox = inbox
    core.emit = lambda outputs: send("out", outputs)
    core.listeners.append(lambda stats: send("step", stats, core.healthy))
    send("ready", ModelFacts.of(core))
    stop = threading.Event()
    threading.Thread(target=_watch, args=(core, send, stop), daemon=True).start()
    try:
        core.run()
    finally:
        stop.set()


def _watch(core, send, stop: threading.Event) -> None:
    """Health changes made outside a step (a bookkeeping failure) and a terminal runner failure, when idle too;
    exits the process when the server process is gone (nothing would ever stop it otherwise)."""
    healthy, failure, parent = core.healthy, None, os.getppid()
    while not stop.wait(POLL_S):
        if os.getppid() != parent:
            log.error("the server process is gone: engine exiting")
            core.runner.close()
            os._exit(1)
        if core.healthy != healthy:
            healthy = core.healthy
            send("health", healthy)
        if core.runner.failure and not failure:
            failure = core.runner.failure
            send("failure", failure)


class ProcessEngine(EngineFront):
    def __init__(self, config: EngineConfig, setup_logging: Callable[[], None] | None = None):
        """`setup_logging` (picklable) configures the engine process's logging like the server's."""
        from transformers import AutoTokenizer

        ctx = mp.get_context("spawn")
        self._inbox = ctx.Queue()
        reader, writer = ctx.Pipe(duplex=False)
        # not a daemon: daemonic processes may not start the tensor-parallel ranks
        self._proc = ctx.Process(target=_engine_main, name="tgis-engine",
                                 args=(config, self._inbox, writer, setup_logging,
                                       logging.getLogger().getEffectiveLevel()))
        self._proc.start()
        writer.close()  # the engine holds the only write end: its death closes the pipe
        self._reader = reader
        self._failure: str | None = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
            facts = self._wait_ready()
        except BaseException:
            self._proc.kill()  # a non-daemon child left running would block this process's exit
            self._proc.join()
            raise
        super().__init__(facts, tokenizer)
        self._receiver = threading.Thread(target=self._receive, name="tgis-engine-receiver", daemon=True)
        self._receiver.start()

    def _wait_ready(self) -> ModelFacts:
        if not self._reader.poll(START_TIMEOUT_S):
            raise EngineStartError(f"the engine did not load the model within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self._reader.recv()
        except EOFError:
            self._proc.join(timeout=10)
            raise EngineStartError(f"the engine process exited with code {self._proc.exitcode}") from None
        if kind == "error":
            self._proc.join(timeout=30)
            raise EngineStartError(payload)
        return payload

    def _receive(self) -> None:
        while True:
            try:
                kind, *payload = self._reader.recv()
            except (EOFError, OSError):
                break
            if kind == "out":
                self._dispatch(payload[0])
            elif kind == "step":
                self._on_step(*payload)
            elif kind == "health":
                self._healthy = payload[0]
            elif kind == "failure":
                self._failure = payload[0]
        self._proc.join(timeout=10)
        if self._proc.exitcode != 0:
            self._failure = self._failure or f"the engine process exited with code {self._proc.exitcode}"
            self._fail_streams(self._failure)

    def _submit(self, request: EngineRequest) -> None:
        if self._failure and not self._proc.is_alive():
            self._fail_streams(self._failure, [request.request_id])
        else:
            self._inbox.put(request)

    def abort(self, request_id: str) -> None:
        self._inbox.put(Abort(request_id))

    @property
    def failure(self) -> str | None:
        return self._failure

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Abort what is still open (the servers have stopped: nobody waits for it), stop the core, and kill the
        process when it has not exited within `timeout` (a long step, a wedged rank)."""
        with self._lock:
            open_ids = list(self._streams)
        for request_id in open_ids:
            self._inbox.put(Abort(request_id))
        self._inbox.put(Shutdown())
        self._proc.join(timeout=timeout)
        if self._proc.is_alive():
            log.warning("the engine process did not stop within %.0f s: killing it", timeout)
            self._proc.kill()
            self._proc.join()
        self._receiver.join(timeout=10)
        self.grammars.close()

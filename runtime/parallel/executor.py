"""Tensor parallelism over processes: rank 0 drives, ranks 1..N-1 replay.

Rank 0 is the serving process: it runs the scheduler and the sampler, and its model runner is a `ShardedRunner`
that sends every runner call to the other ranks over a pipe before running it on its own shard. Each rank replays
the same calls on its shard, so the forwards meet in the same collectives (an all-reduce after each row-parallel
layer, an all-gather of the logits) and every rank's KV cache holds its own heads of the same rows. Only token ids
cross the pipes; activations cross torch.distributed (NCCL on GPUs, gloo on CPU).

Batches are named by handles. A worker keeps its copy of a batch exactly as long as rank 0 keeps the object: a
weakref finalizer queues the handle for release, and the release travels with the next call. Any failure breaks
the whole group (ranks may be stuck in different collectives), so the server exits, as TGIS does when a shard dies.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import weakref
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.engine.config import EngineConfig
from runtime.engine.model_runner import Batch, ModelRunner, PrefillItem
from runtime.models.loader import LoadedModel, load_model, resolve_device
from runtime.parallel.rules import plan

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 1800.0  # model loading on every rank
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(config: EngineConfig, rank: int, world_size: int) -> torch.device:
    """GPU `rank` when on CUDA (TGIS refuses more shards than GPUs), else the configured device."""
    device = resolve_device(config.device)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if world_size > count:
        raise ValueError(f"{world_size} shards configured but only {count} GPUs detected")
    return torch.device("cuda", rank)


def _load_rank(config: EngineConfig, rank: int, world_size: int, port: int) -> LoadedModel:
    device = rank_device(config, rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return load_model(config.model_path, config.dtype, str(device), config.trust_remote_code,
                      shard=(rank, world_size))


def _worker(rank: int, world_size: int, port: int, config: EngineConfig, conn: Connection) -> None:
    """Ranks 1..N-1: load the shard, then replay rank 0's runner calls until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 coordinates shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"Shard {rank}: %(levelname)s %(name)s: %(message)s")
    try:
        runner = ModelRunner(_load_rank(config, rank, world_size, port))
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the start-up with it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    batches: dict[int, Batch] = {}
    while True:
        try:
            released, op, args = conn.recv()
        except EOFError:  # rank 0 is gone
            break
        for handle in released:
            batches.pop(handle, None)
        if op == "stop":
            break
        if op == "prefill":
            handle, items = args
            batches[handle] = runner.prefill(items)[0]
        elif op == "decode":
            handle, tokens = args
            runner.decode(batches[handle], torch.tensor(tokens, dtype=torch.long))
        elif op == "merge":
            a, b = args
            runner.merge(None if a is None else batches[a], batches[b])
        elif op == "keep":
            handle, rows = args
            runner.keep(batches[handle], rows)
    dist.destroy_process_group()


def _stop(procs: list, conns: list[Connection]) -> None:
    for conn in conns:
        try:
            conn.send(([], "stop", ()))
        except OSError:
            pass
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


class ShardedRunner:
    """Rank 0's model runner: the `ModelRunner` interface, each call mirrored to the other ranks first."""

    def __init__(self, local: ModelRunner, procs: list, conns: list[Connection]):
        self.local = local
        self.loaded = local.loaded
        self._procs, self._conns = procs, conns
        self._next = itertools.count()
        self._released: list[int] = []
        self._stopping = False
        self.failure: str | None = None
        self._finalizer = weakref.finalize(self, _stop, procs, conns)
        self._watcher = threading.Thread(target=self._watch, name="tgis-shard-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        sentinels = [p.sentinel for p in self._procs]
        rank = sentinels.index(wait(sentinels)[0]) + 1
        proc = self._procs[rank - 1]
        proc.join()  # the sentinel fires when the process closes its handles, slightly before it can be reaped
        if not self._stopping:
            self.failure = f"Shard {rank} exited with code {proc.exitcode}"
            log.error(self.failure)

    def _send(self, op: str, *args) -> None:
        if self.failure:
            raise RuntimeError(self.failure)
        released = self._released[:]
        del self._released[:len(released)]  # in place: the finalizers hold this list
        for conn in self._conns:
            conn.send((released, op, args))

    def _track(self, batch: Batch, handle: int) -> None:
        batch.handle = handle
        weakref.finalize(batch, self._released.append, handle)  # the other ranks drop their copy with ours

    def _guard(self, fn, *args):
        """A local failure leaves the other ranks in an unknown collective: the group is no longer usable."""
        try:
            return fn(*args)
        except Exception as exc:
            self._watcher.join(timeout=2)  # a rank that died mid-collective is the cause worth reporting
            self.failure = self.failure or f"tensor-parallel group broken: {type(exc).__name__}: {exc}"
            raise

    def prefill(self, items: list[PrefillItem]) -> tuple[Batch, torch.Tensor, list[torch.Tensor | None]]:
        if any(it.lora for it in items):  # the front end refuses these; never let one reach the ranks
            raise ValueError("LoRA adapters are not supported with tensor parallelism yet")
        handle = next(self._next)
        self._send("prefill", handle, items)
        result = self._guard(self.local.prefill, items)
        self._track(result[0], handle)
        return result

    def decode(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        self._send("decode", batch.handle, tokens.tolist())
        return self._guard(self.local.decode, batch, tokens)

    def merge(self, a: Batch | None, b: Batch) -> Batch:
        self._send("merge", None if a is None else a.handle, b.handle)
        return self.local.merge(a, b)

    def keep(self, batch: Batch, rows: list[int]) -> Batch | None:
        self._send("keep", batch.handle, rows)
        return self.local.keep(batch, rows)

    def close(self) -> None:
        self._stopping = True
        self._finalizer()
        if dist.is_initialized():
            dist.destroy_process_group()


def start_sharded(config: EngineConfig) -> ShardedRunner:
    """Spawn ranks 1..N-1, load rank 0's shard here, and wait until every rank has its shard."""
    world_size = config.tensor_parallel_size
    if dist.is_initialized():  # rank 0 uses the default process group: one sharded engine per process
        raise RuntimeError("a tensor-parallel engine is already running in this process")
    model_config = json.loads((Path(config.model_path) / "config.json").read_text())
    plan(model_config, world_size, model_config.get("vocab_size") or world_size)  # fail before spawning
    rank_device(config, 0, world_size)
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(1, world_size):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(rank, world_size, port, config, child), name=f"tgis-shard-{rank}",
                           daemon=True)
        proc.start()
        child.close()
        procs.append(proc)
        conns.append(parent)
    try:
        local = ModelRunner(_load_rank(config, 0, world_size, port))
        for rank, conn in enumerate(conns, start=1):
            if not conn.poll(READY_TIMEOUT_S):
                raise RuntimeError(f"Shard {rank} did not load its model within {READY_TIMEOUT_S:.0f} s")
            try:
                status, detail = conn.recv()
            except EOFError:
                procs[rank - 1].join(timeout=10)
                status, detail = "error", f"exited with code {procs[rank - 1].exitcode}"
            if status != "ready":
                raise RuntimeError(f"Shard {rank} failed to start: {detail}")
    except BaseException:
        _stop(procs, conns)
        raise
    log.info("tensor parallelism: %d ranks ready", world_size)
    return ShardedRunner(local, procs, conns)

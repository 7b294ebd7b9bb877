"""Tensor parallelism over processes: rank 0 drives, ranks 1..N-1 replay.

Rank 0 is the serving process: it runs the scheduler and the sampler, and its model runner is a `ShardedRunner`
that sends every runner call (KV sizing, then one step plan per step) to the other ranks over a pipe before running
it on its own shard. Each rank replays the same calls on its shard, so the forwards meet in the same collectives
(an all-reduce after each row-parallel layer, an all-gather of the logits) and every rank's KV cache holds its own
heads of the same sequences. Only plans (token ids, block ids, prompt-prefix tensors) cross the pipes; activations
cross torch.distributed (NCCL on GPUs, gloo on CPU). Any failure breaks the whole group (ranks may be stuck in
different collectives), so the server exits, as TGIS does when a shard dies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
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
from runtime.engine.plan import ModelOutput, StepPlan
from runtime.engine.process import freeze_loaded_objects
from runtime.engine.runner import ModelRunner, local_runner
from runtime.models.loader import resolve_device
from runtime.parallel.deepspeed import split_method
from runtime.parallel.sharding import read_manifest
from runtime.threads import claim_engine_cores

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


def _start_rank(config: EngineConfig, engine: str, rank: int, world_size: int, port: int) -> ModelRunner:
    device = rank_device(config, rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks share the cores (with the front end)
        claim_engine_cores(world_size)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return local_runner(config, engine, shard=(rank, world_size))


def _worker(rank: int, world_size: int, port: int, config: EngineConfig, engine: str, conn: Connection) -> None:
    """Ranks 1..N-1: load the shard, then replay rank 0's runner calls until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 coordinates shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"Shard {rank}: %(levelname)s %(name)s: %(message)s")
    try:
        runner = _start_rank(config, engine, rank, world_size, port)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the start-up with it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    freeze_loaded_objects()
    conn.send(("ready", None))
    while True:
        try:
            op, args = conn.recv()
        except EOFError:  # rank 0 is gone
            break
        if op == "stop":
            break
        getattr(runner, op)(*args)
    dist.destroy_process_group()


def _stop(procs: list, conns: list[Connection]) -> None:
    for conn in conns:
        try:
            conn.send(("stop", ()))
        except OSError:
            pass
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


class ShardedRunner:
    """Rank 0's model runner: the runner interface, each call mirrored to the other ranks first."""

    def __init__(self, local: ModelRunner, procs: list, conns: list[Connection]):
        self.local = local
        self.loaded = local.loaded
        self.paged, self.chunked_prefill = local.paged, local.chunked_prefill
        self._procs, self._conns = procs, conns
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

    def _mirror(self, op: str, *args):
        """Send the call to every other rank, then run it here. A local failure leaves the other ranks in an unknown
        collective: the group is no longer usable."""
        if self.failure:
            raise RuntimeError(self.failure)
        for conn in self._conns:
            conn.send((op, args))
        try:
            return getattr(self.local, op)(*args)
        except Exception as exc:
            self._watcher.join(timeout=2)  # a rank that died mid-collective is the cause worth reporting
            self.failure = self.failure or f"tensor-parallel group broken: {type(exc).__name__}: {exc}"
            raise

    def kv_capacity(self, config: EngineConfig, max_sequence_length: int) -> int:
        return self._mirror("kv_capacity", config, max_sequence_length)

    def check_adapter(self, ref) -> None:
        raise ValueError("LoRA adapters are not supported with tensor parallelism yet")

    def execute(self, plan: StepPlan) -> ModelOutput:
        return self._mirror("execute", plan)

    def close(self) -> None:
        self._stopping = True
        self._finalizer()
        if dist.is_initialized():
            dist.destroy_process_group()


def start_sharded(config: EngineConfig, engine: str) -> ShardedRunner:
    """Spawn ranks 1..N-1, load rank 0's shard here, and wait until every rank has its shard."""
    world_size = config.tensor_parallel_size
    if dist.is_initialized():  # rank 0 uses the default process group: one sharded engine per process
        raise RuntimeError("a tensor-parallel engine is already running in this process")
    model_config = json.loads((Path(config.model_path) / "config.json").read_text())
    method = split_method(model_config, config.tensor_parallel_method, world_size,  # fail before spawning
                          presplit=read_manifest(config.model_path) is not None)
    config = dataclasses.replace(config, tensor_parallel_method=method)  # what every rank loads with
    rank_device(config, 0, world_size)
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(1, world_size):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(rank, world_size, port, config, engine, child),
                           name=f"tgis-shard-{rank}", daemon=True)
        proc.start()
        child.close()
        procs.append(proc)
        conns.append(parent)
    try:
        local = _start_rank(config, engine, 0, world_size, port)
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

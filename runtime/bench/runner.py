"""Run a workload against a target `repeat` times, each run's metrics with the prefix-cache hit rate it saw."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from runtime.bench.driver import run_requests
from runtime.bench.errors import BenchError
from runtime.bench.prefix_cache import hit_rate
from runtime.bench.report import run_metrics
from runtime.bench.workload import Workload, arrival_times, build_requests


async def measure(target, payloads: list, workload: Workload, repeat: int = 1,
                  on_done: Callable[[], None] = lambda: None) -> list[dict]:
    """The metrics of each run. A run in which every request failed stops the benchmark: its numbers would
    describe nothing (a server that refuses the workload, such as guided requests it cannot serve)."""
    arrivals = arrival_times(workload)
    runs = []
    async with target:
        for _ in range(repeat):
            before = await target.prefix_cache()
            result = await run_requests(payloads, target.send, workload.concurrency, arrivals, on_done)
            metrics = run_metrics(result, hit_rate(before, await target.prefix_cache()))
            if payloads and not metrics["requests"]:
                status, message = next(iter(metrics["error_examples"].items()))
                raise BenchError(f"all {len(payloads)} requests failed ({status} × {metrics['errors']}): {message}")
            runs.append(metrics)
    return runs


def bench_engine(engine, workload: Workload) -> dict:
    """One run of `workload` on an in-process engine front (an AsyncEngine): its metrics."""
    from runtime.bench.target_engine import EngineTarget

    target = EngineTarget(engine)
    return asyncio.run(measure(target, target.prepare(build_requests(workload, engine.tokenizer)), workload))[0]


def bench_grpc(address: str, tokenizer, workload: Workload, metrics_url: str | None = None) -> dict:
    """One run of `workload` on a server at HOST:PORT over gRPC: its metrics."""
    from runtime.bench.target_grpc import GrpcTarget

    target = GrpcTarget(address, tokenizer, metrics_url)
    return asyncio.run(measure(target, target.prepare(build_requests(workload, tokenizer)), workload))[0]

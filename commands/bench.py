"""`tgis bench`: throughput and latency of the engine in-process, or of a running server over gRPC."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from commands._common import resolve_model

console = Console()


def _range(value: str) -> tuple[int, int]:
    lo, _, hi = value.partition(":")
    return int(lo), int(hi or lo)


def bench(
    model: str | None = typer.Argument(None, help="Model directory or cached hub id (default: built-in SmolLM2)."),
    num_requests: int = typer.Option(32, "--num-requests", "-n", min=1, help="Requests in the workload."),
    input_len: str = typer.Option("16:128", "--input-len", help="Prompt length range MIN:MAX (tokens)."),
    output_len: str = typer.Option("16:64", "--output-len", help="Output length range MIN:MAX (tokens, forced)."),
    concurrency: int = typer.Option(16, "--concurrency", "-c", min=1, help="Requests in flight at once."),
    max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Engine batch size (in-process)."),
    seed: int = typer.Option(0, "--seed", help="Workload seed."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype (in-process)."),
    device: str | None = typer.Option(None, "--device", help="Device (in-process)."),
    num_gpus: int = typer.Option(1, "--num-gpus", min=1, help="Tensor-parallel ranks (processes; one GPU each "
                                 "on CUDA)."),
    grpc_address: str | None = typer.Option(None, "--grpc", help="Benchmark a running server at HOST:PORT instead."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the report as JSON here."),
) -> None:
    """Run a random-prompt workload and report output tokens/s, TTFT, time per output token and latency."""
    from runtime.bench import Workload, bench_engine, bench_grpc

    workload = Workload(num_requests, _range(input_len), _range(output_len), concurrency, seed)
    path = resolve_model(model)
    if grpc_address:
        from transformers import AutoTokenizer

        report = bench_grpc(grpc_address, AutoTokenizer.from_pretrained(path), workload)
    else:
        from runtime.engine.async_engine import AsyncEngine
        from runtime.engine.config import EngineConfig

        engine = AsyncEngine(EngineConfig(model_path=str(path), dtype=dtype, device=device,
                                          max_batch_size=max_batch_size, tensor_parallel_size=num_gpus))
        try:
            report = bench_engine(engine, workload)
        finally:
            engine.shutdown()
    table = Table(title=f"tgis bench: {report.target}, {report.requests} requests")
    for col in ("metric", "mean", "p50", "p90", "p99"):
        table.add_column(col)
    for name, values in (("TTFT ms", report.ttft_ms), ("TPOT ms", report.tpot_ms), ("latency ms", report.latency_ms)):
        table.add_row(name, *(f"{values.get(k, float('nan')):.1f}" for k in ("mean", "p50", "p90", "p99")))
    console.print(table)
    console.print(f"output tokens: {report.output_tokens} in {report.duration_s:.2f} s = "
                  f"[bold]{report.output_tokens_per_s:.1f} tok/s[/bold], {report.requests_per_s:.2f} req/s")
    if output:
        output.write_text(json.dumps(report.to_dict(), indent=2))

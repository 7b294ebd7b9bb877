"""`tgis bench`: throughput and latency of the engine in-process, or of a running server over gRPC or the OpenAI
HTTP API, on a reproducible workload; with `--baseline` a CI gate that fails on a regression."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from commands._common import err_console, resolve_model

console = Console()
LOAD_FORMATS = ("auto", "dummy")
WORKLOAD_OPTIONS = ("num_requests", "input_len", "output_len", "shared_prefix", "dataset", "concurrency",
                    "request_rate", "seed", "guided")


def _length_range(value: str | None) -> tuple[int, int] | None:
    """`N` or `MIN:MAX` (tokens) → (min, max)."""
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise typer.BadParameter(f"expected N or MIN:MAX in tokens, got {value!r}") from None
    if low < 1 or low > high:
        raise typer.BadParameter(f"{value!r}: need 1 <= MIN <= MAX")
    return low, high


def _guided_schema(value: str | None) -> str | None:
    """A JSON schema, from a file or inline, as compact JSON text (what requests carry and reports record)."""
    if value is None:
        return None
    try:
        schema = json.loads(Path(value).read_text() if _is_file(value) else value)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"expected a JSON schema (a file or inline JSON): {exc}") from None
    if not isinstance(schema, dict):
        raise typer.BadParameter("a JSON schema is a JSON object")
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except OSError:  # inline JSON longer than a file name can be
        return False


def _address(value: str | None) -> str | None:
    if value is not None:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit():
            raise typer.BadParameter(f"expected HOST:PORT, got {value!r}")
    return value


def bench(
    model: str | None = typer.Argument(None, help="Model directory or cached hub id (default: built-in SmolLM2). "
                                       "With --load-format dummy: a config.json, a directory with one, or a named "
                                       "shape (llama-3-8b, llama-3.2-1b, qwen3-0.6b, smollm2-135m)."),
    num_requests: int = typer.Option(32, "--num-requests", "-n", min=1, help="Requests in the workload."),
    input_len: str = typer.Option("16:128", "--input-len", callback=_length_range,
                                  help="Random prompt length N or range MIN:MAX (tokens, after the shared prefix)."),
    output_len: str | None = typer.Option(None, "--output-len", callback=_length_range,
                                          help="Output length N or range MIN:MAX (tokens, forced). Default 16:64, "
                                          "or the dataset's lengths where it has them."),
    shared_prefix: int = typer.Option(0, "--shared-prefix", min=0,
                                      help="Every prompt starts with the same N random tokens (prefix caching)."),
    dataset: Path | None = typer.Option(None, "--dataset", exists=True, dir_okay=False, readable=True,
                                        help="Prompts from a local JSONL/JSON file: prompts, or ShareGPT "
                                        "conversations (first human turn; the reply's length as output length)."),
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1,
                                           help="Requests in flight at most (default: 16; unbounded with "
                                           "--request-rate)."),
    request_rate: float | None = typer.Option(None, "--request-rate",
                                              help="Send requests at R per second (Poisson arrivals, seeded) "
                                              "instead of all at once."),
    seed: int = typer.Option(0, "--seed", help="Workload seed (prompts, lengths, arrival times)."),
    guided: str | None = typer.Option(None, "--guided", callback=_guided_schema,
                                      help="JSON schema (file or inline) every output must follow; output lengths "
                                      "become upper bounds."),
    repeat: int = typer.Option(1, "--repeat", min=1, help="Run the workload K times; report and gate the median."),
    engine: str = typer.Option("auto", "--engine", help="In-process: auto (native where it serves the "
                               "architecture), native or transformers."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching",
                                        help="In-process: reuse the KV cache of shared prompt prefixes (native)."),
    async_scheduling: bool | None = typer.Option(None, "--async-scheduling/--no-async-scheduling",
                                                 help="In-process: plan each step while the one before runs "
                                                 "(native; default: on GPUs)."),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype", help="In-process: auto (the model's dtype) or "
                                       "fp8 (native)."),
    max_waiting_tokens: int = typer.Option(24, "--max-waiting-tokens", min=1, help="In-process: TGIS' min-join "
                                           "rule (1: join at once)."),
    load_format: str = typer.Option("auto", "--load-format", help="In-process: auto (the model's weights) or "
                                    "dummy (random weights of MODEL's shape)."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Tokenizer model for dummy weights and for "
                                         "servers' prompts (default: MODEL, else the built-in model)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype (in-process)."),
    device: str | None = typer.Option(None, "--device", help="Device (in-process)."),
    max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Engine batch size (in-process)."),
    max_sequence_length: int | None = typer.Option(None, "--max-sequence-length", min=1,
                                                   help="Engine sequence limit (in-process; default: the model's)."),
    num_gpus: int = typer.Option(1, "--num-gpus", min=1, help="Tensor-parallel ranks (in-process; processes, one "
                                 "GPU each on CUDA)."),
    grpc_address: str | None = typer.Option(None, "--grpc", callback=_address,
                                            help="Benchmark a running server at HOST:PORT over gRPC instead."),
    openai_url: str | None = typer.Option(None, "--openai", help="Benchmark a running server's OpenAI API "
                                          "(/v1/completions, streamed) at URL instead."),
    metrics_url: str | None = typer.Option(None, "--metrics-url", help="The server's /metrics, for its prefix-cache "
                                           "hit rate (default: port 3000 of the --grpc host; URL/metrics)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the JSON report here."),
    json_output: bool = typer.Option(False, "--json", help="Print the JSON report instead of tables (no progress)."),
    baseline: Path | None = typer.Option(None, "--baseline", exists=True, dir_okay=False, readable=True,
                                         help="Gate: compare with this report of the same workload; exit 1 when a "
                                         "metric regressed beyond tolerance."),
    max_regression: list[str] = typer.Option([], "--max-regression", help="Gate tolerance: PCT for every timed "
                                             "metric (default 10%), NAME=PCT or NAME=off for one metric "
                                             "(ttft_ms.p99) or group (ttft_ms). Repeatable."),
) -> None:
    """Run a workload; report tok/s, req/s, TTFT, inter-token and end-to-end latency (p50/p90/p99/max),
    prefix-cache hit rate and errors by status; with --baseline, fail on a regression."""
    # reports carry every option: the workload's in their workload, the rest (where the report goes aside) here
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items() if k not in WORKLOAD_OPTIONS
                and k not in ("output", "json_output")}
    from runtime.bench import BenchError
    from runtime.bench.workload import Workload
    from runtime.engine.config import ENGINES

    if load_format not in LOAD_FORMATS:
        raise typer.BadParameter(f"expected one of {', '.join(LOAD_FORMATS)}", param_hint="'--load-format'")
    if engine not in ENGINES:
        raise typer.BadParameter(f"expected one of {', '.join(ENGINES)}", param_hint="'--engine'")
    if request_rate is not None and request_rate <= 0:
        raise typer.BadParameter("must be > 0 (requests per second)", param_hint="'--request-rate'")
    if grpc_address and openai_url:
        raise typer.BadParameter("choose one of --grpc and --openai", param_hint="'--openai'")
    if max_regression and baseline is None:
        raise typer.BadParameter("a tolerance needs --baseline", param_hint="'--max-regression'")
    tolerances = _tolerances(max_regression)
    base = _load_baseline(baseline)
    workload = Workload(num_requests, input_len, output_len, concurrency or (None if request_rate else 16), seed,
                        shared_prefix, str(dataset) if dataset else None, request_rate, guided)
    try:
        report = _run(workload, settings, base, not json_output and err_console.is_terminal)
    except BenchError as exc:
        typer.echo(f"tgis bench: {exc}", err=True)
        raise typer.Exit(1) from None
    if not json_output:
        from runtime.bench.report import render

        render(report, console)
    regressed = _gate(report, base, tolerances, json_output)
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    if output:
        output.write_text(json.dumps(report, indent=2) + "\n")
    if regressed:
        typer.echo(f"tgis bench: regressed beyond tolerance against {baseline}: {', '.join(regressed)}", err=True)
        raise typer.Exit(1)


def _tolerances(values: list[str]) -> dict:
    from runtime.bench.gate import parse_tolerances

    try:
        return parse_tolerances(values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--max-regression'") from None


def _load_baseline(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        base = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"{path} is not a JSON report: {exc}", param_hint="'--baseline'") from None
    if not isinstance(base, dict) or not isinstance(base.get("workload"), dict) or "metrics" not in base:
        raise typer.BadParameter(f"{path} is not a tgis bench report (no workload/metrics)", param_hint="'--baseline'")
    return base


def _run(workload, settings: dict, base: dict | None, show_progress: bool) -> dict:
    """Open the target, build the requests, refuse a baseline of another workload, measure, report."""
    from runtime.bench.gate import workload_differences
    from runtime.bench.report import build_report
    from runtime.bench.runner import measure
    from runtime.bench.workload import build_requests, identity

    with contextlib.ExitStack() as stack:
        target = _open_target(settings, stack)
        requests = build_requests(workload, target.tokenizer)
        ident = identity(workload, requests)
        if base is not None and (diffs := workload_differences(base, ident)):
            raise typer.BadParameter(f"{settings['baseline']} was measured on another workload ({'; '.join(diffs)})"
                                     ": run the same workload or record a new baseline", param_hint="'--baseline'")
        payloads = target.prepare(requests)
        with Progress(TextColumn("tgis bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True, disable=not show_progress) as progress:
            task = progress.add_task("requests", total=len(payloads) * settings["repeat"])
            runs = asyncio.run(measure(target, payloads, workload, settings["repeat"],
                                       lambda: progress.advance(task)))
        return build_report(ident, settings, target.describe(), runs)


def _open_target(s: dict, stack: contextlib.ExitStack):
    """The target the options name; what it holds (an in-process engine, a dummy model's directory) is released
    when `stack` closes."""
    from runtime.bench import BenchError

    if s["load_format"] == "dummy" and (s["grpc_address"] or s["openai_url"]):
        raise typer.BadParameter("random weights are for the in-process engine", param_hint="'--load-format'")
    if s["grpc_address"] or s["openai_url"]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model(s["tokenizer"] or s["model"]))
        if s["grpc_address"]:
            from runtime.bench.target_grpc import GrpcTarget, default_metrics_url

            return GrpcTarget(s["grpc_address"], tok, s["metrics_url"] or default_metrics_url(s["grpc_address"]))
        from runtime.bench.target_openai import OpenAITarget, default_metrics_url

        return OpenAITarget(s["openai_url"], tok, s["metrics_url"] or default_metrics_url(s["openai_url"]))
    from runtime.bench.target_engine import EngineTarget

    try:
        engine = _engine(s, stack)
    except (ValueError, OSError) as exc:
        raise BenchError(f"cannot start the engine: {exc}") from exc
    stack.callback(engine.shutdown)
    return EngineTarget(engine)


def _engine(s: dict, stack: contextlib.ExitStack):
    """An in-process engine; for dummy weights over a weightless model directory written for the run."""
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.config import EngineConfig

    options = {"dtype": s["dtype"], "device": s["device"], "engine": s["engine"], "max_batch_size": s["max_batch_size"],
               "max_sequence_length": s["max_sequence_length"], "tensor_parallel_size": s["num_gpus"],
               "prefix_caching": s["prefix_caching"], "async_scheduling": s["async_scheduling"],
               "kv_cache_dtype": s["kv_cache_dtype"], "max_waiting_tokens": s["max_waiting_tokens"]}
    if s["load_format"] == "auto":
        return AsyncEngine(EngineConfig(model_path=str(resolve_model(s["model"])), load_format="auto", **options))
    from runtime.engine.runner import choose_engine
    from runtime.models.dummy import write_dummy_model
    from runtime.models.loader import load_dummy_model

    if not s["model"]:
        raise typer.BadParameter("--load-format dummy needs MODEL: a config.json, a directory with one, or a named "
                                 "shape", param_hint="MODEL")
    tokenizer = resolve_model(s["tokenizer"])
    directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tgis-dummy-")))
    try:
        path = write_dummy_model(s["model"], tokenizer, directory)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="MODEL") from None
    config = EngineConfig(model_path=str(path), load_format="dummy", **options)
    if choose_engine(config) == "native":  # the native loader fills its own shapes
        return AsyncEngine(config)
    if s["num_gpus"] > 1:
        raise typer.BadParameter("random transformers weights run on one rank", param_hint="'--num-gpus'")
    return AsyncEngine(config, load_dummy_model(path, s["dtype"], s["device"]))


def _gate(report: dict, base: dict | None, tolerances: dict, quiet: bool) -> list[str]:
    """Compare with the baseline (the verdicts go into the report); the names of the metrics that regressed."""
    if base is None:
        return []
    from runtime.bench.gate import compare, render_gate, target_differences

    verdicts = compare(base, report, tolerances)
    notes = target_differences(base, report["target"])
    regressed = [v.metric for v in verdicts if v.regressed]
    report["gate"] = {"baseline": report["settings"]["baseline"], "tolerances": tolerances, "notes": notes,
                      "verdicts": [asdict(v) for v in verdicts], "regressed": regressed}
    if not quiet:
        render_gate(verdicts, notes, console)
    return regressed

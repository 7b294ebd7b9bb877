"""Metrics of a run, the report that carries them with everything needed to reproduce them, and its table.

A report (JSON) holds the workload (settings and a digest of the requests), the command's settings, the target as
it described itself (engine, dtype, device; a server's model info), the environment (versions), the median
metrics over `--repeat` runs and each run's own metrics. Latencies are in milliseconds.
"""

from __future__ import annotations

import platform
import statistics
from collections import Counter
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from itertools import pairwise

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runtime.bench.driver import RunResult

REPORT_FORMAT = "tgis-bench/1"
LATENCIES = {"ttft_ms": "TTFT", "itl_ms": "inter-token", "e2e_ms": "end-to-end"}
STATS = ("mean", "p50", "p90", "p99", "max")


def latency_summary(seconds: list[float]) -> dict[str, float | None]:
    """Mean, percentiles (linear interpolation) and max in ms; all None without samples."""
    if not seconds:
        return dict.fromkeys(STATS)
    ms = sorted(s * 1000 for s in seconds)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"mean": statistics.fmean(ms), "p50": q[49], "p90": q[89], "p99": q[98], "max": ms[-1]}


def run_metrics(result: RunResult, prefix_cache_hit_rate: float | None) -> dict:
    """One run's metrics (successful requests only; failed ones are counted by status)."""
    ok = [r for r in result.records if r.error is None]
    failed = [r for r in result.records if r.error is not None]
    seconds = result.duration_s
    prompt, output = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    examples: dict[str, str] = {}
    for r in failed:
        examples.setdefault(r.error, r.message or "")
    return {
        "requests": len(ok),
        "errors": len(failed),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "duration_s": seconds,
        "output_tok_s": output / seconds,
        "prompt_tok_s": prompt / seconds,
        "request_s": len(ok) / seconds,
        "ttft_ms": latency_summary([r.token_times[0] - r.start for r in ok if r.token_times]),
        "itl_ms": latency_summary([b - a for r in ok for a, b in pairwise(r.token_times)]),
        "e2e_ms": latency_summary([r.end - r.start for r in ok]),
        "prefix_cache_hit_rate": prefix_cache_hit_rate,
        "errors_by_status": dict(Counter(r.error for r in failed)),
        "error_examples": examples,
    }


def flatten(metrics: dict) -> dict[str, float | None]:
    """Numeric metrics by dotted name (`ttft_ms.p99`); the per-status error tables are not metrics."""
    flat: dict[str, float | None] = {}
    for name, value in metrics.items():
        if name in LATENCIES and isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items()})
        elif not isinstance(value, dict):
            flat[name] = value
    return flat


def median_metrics(runs: list[dict]) -> dict:
    """The median of every metric over the runs (None where any run lacks it); error tables summed."""
    flats = [flatten(m) for m in runs]
    medians = {k: None if any(f[k] is None for f in flats) else statistics.median(f[k] for f in flats)
               for k in flats[0]}
    out: dict = {}
    for name, value in medians.items():
        group, _, stat = name.partition(".")
        if stat:
            out.setdefault(group, {})[stat] = value
        else:
            out[name] = value
    out["errors_by_status"] = dict(sum((Counter(m["errors_by_status"]) for m in runs), Counter()))
    out["error_examples"] = {k: v for m in reversed(runs) for k, v in m["error_examples"].items()}
    return out


def environment() -> dict:
    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    versions = {name: installed(name) for name in ("tgis", "torch", "transformers", "grpcio")}
    return {"versions": versions | {"python": platform.python_version()}, "platform": platform.platform()}


def build_report(workload: dict, settings: dict, target: dict, runs: list[dict]) -> dict:
    return {"format": REPORT_FORMAT, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "workload": workload, "settings": settings, "target": target, "environment": environment(),
            "metrics": median_metrics(runs), "runs": runs}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(report: dict, console: Console) -> None:
    m, runs = report["metrics"], len(report["runs"])
    target = report["target"]
    parts = [target["target"], report["settings"].get("model") or "default model",
             " ".join(str(v) for v in (target.get("dtype"), target.get("device_name")) if v),
             f"{report['workload']['num_requests']} requests", f"median of {runs} runs" if runs > 1 else ""]
    table = Table(title="tgis bench: " + " · ".join(p for p in parts if p))
    for col in ("latency ms", *STATS):
        table.add_column(col, justify="right" if col != "latency ms" else "left")
    for name, label in LATENCIES.items():
        table.add_row(label, *(_ms(m[name][k]) for k in STATS))
    console.print(table)
    console.print(f"throughput: [bold]{m['output_tok_s']:.1f} generated tok/s[/bold], {m['prompt_tok_s']:.1f} prompt "
                  f"tok/s, {m['request_s']:.2f} req/s ({m['duration_s']:.2f} s)")
    rate = m["prefix_cache_hit_rate"]
    console.print(f"tokens: {m['prompt_tokens']:.0f} prompt, {m['output_tokens']:.0f} generated; prefix-cache hit rate "
                  + ("n/a" if rate is None else f"{rate:.1%}"))
    if m["errors"]:
        by_status = ", ".join(f"{k} × {v}" for k, v in m["errors_by_status"].items())
        example = escape(next(iter(m["error_examples"].values())))
        console.print(f"[red]{m['errors']:.0f} failed requests[/red] ({escape(by_status)}); e.g. {example}")

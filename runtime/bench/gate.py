"""The CI gate: a report's median metrics against a baseline report of the same workload.

Direction-aware: throughput and hit rate regress when they fall, latency percentiles when they rise, each beyond
its tolerance (relative to the baseline). Counts must not change at all: with forced output lengths the numbers
of requests and tokens are a property of the workload, so a change means the engine now does something else.
Failed requests must not increase. Means and maxima are reported, not gated: one outlier moves them.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.bench.report import LATENCIES, flatten

# metric -> direction: "higher"/"lower" is better (within the tolerance), "exact", "at_most" (the baseline's)
GATED: dict[str, str] = {
    "requests": "exact", "prompt_tokens": "exact", "output_tokens": "exact", "errors": "at_most",
    "output_tok_s": "higher", "prompt_tok_s": "higher", "request_s": "higher", "prefix_cache_hit_rate": "higher",
    **{f"{group}.{p}": "lower" for group in LATENCIES for p in ("p50", "p90", "p99")},
}
# workload keys that locate rather than define it (the digest covers the dataset's content)
LOCATION_KEYS = {"dataset"}
# what the target said about itself that makes numbers incomparable when it differs (warned about, not refused)
TARGET_KEYS = ("target", "engine", "model_class", "dtype", "device", "device_name", "tensor_parallel_size")

Tolerances = dict[str, float | None]  # metric or group name ("" = default) -> fraction allowed; None = not gated


def parse_tolerances(values: list[str]) -> Tolerances:
    """`10%` (the default for every timed metric) and `NAME=PCT` / `NAME=off` for a metric (`ttft_ms.p99`) or a
    group (`ttft_ms`); a bare number is a percentage too."""
    out: Tolerances = {"": 0.10}
    for value in values:
        name, _, pct = value.rpartition("=")
        if name and name not in GATED and name not in LATENCIES:
            raise ValueError(f"{value!r}: no gated metric {name!r}; gated: {', '.join([*LATENCIES, *GATED])}")
        if pct.strip().lower() == "off":
            out[name] = None
            continue
        try:
            fraction = float(pct.strip().removesuffix("%")) / 100
        except ValueError:
            fraction = -1.0
        if fraction < 0:
            raise ValueError(f"{value!r}: expected a percentage such as 10% (or NAME=10%, NAME=off)")
        out[name] = fraction
    return out


def tolerance(metric: str, tolerances: Tolerances) -> float | None:
    for key in (metric, metric.partition(".")[0]):
        if key in tolerances:
            return tolerances[key]
    return tolerances[""]


def workload_differences(baseline: dict, workload: dict) -> list[str]:
    """Why two reports are not of the same workload ("" list when they are)."""
    old = baseline.get("workload") or {}
    keys = sorted((set(old) | set(workload)) - LOCATION_KEYS)
    return [f"{k}: baseline {old.get(k)!r}, now {workload.get(k)!r}" for k in keys if old.get(k) != workload.get(k)]


def target_differences(baseline: dict, target: dict) -> list[str]:
    old = baseline.get("target") or {}
    return [f"{k}: baseline {old.get(k)!r}, now {target.get(k)!r}" for k in TARGET_KEYS if old.get(k) != target.get(k)]


@dataclass(frozen=True)
class Verdict:
    metric: str
    direction: str
    baseline: float | None
    current: float | None
    change: float | None  # (current - baseline) / baseline; None when not computable
    tolerance: float | None  # None: exact/at_most rules, or not gated
    regressed: bool


def compare(baseline: dict, report: dict, tolerances: Tolerances) -> list[Verdict]:
    """A verdict for every gated metric both reports measured (and were not switched off)."""
    old, new = flatten(baseline["metrics"]), flatten(report["metrics"])
    verdicts = []
    for metric, direction in GATED.items():
        allowed = tolerance(metric, tolerances)
        if allowed is None or old.get(metric) is None or new.get(metric) is None:
            continue
        a, b = old[metric], new[metric]
        change = (b - a) / a if a else None
        if direction == "exact":
            regressed, allowed = b != a, None
        elif direction == "at_most":
            regressed, allowed = b > a, None
        elif direction == "higher":
            regressed = change is not None and -change > allowed
        else:
            regressed = change is not None and change > allowed
        verdicts.append(Verdict(metric, direction, a, b, change, allowed, regressed))
    return verdicts


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def render_gate(verdicts: list[Verdict], notes: list[str], console) -> None:
    """The gate's table: every compared metric, its change and verdict; then what differs in the target."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="gate against the baseline")
    for col in ("metric", "baseline", "now", "change", "allowed", "verdict"):
        table.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for v in verdicts:
        allowed = {"exact": "equal", "at_most": "<= baseline"}.get(v.direction) or (
            f"{'-' if v.direction == 'higher' else '+'}{v.tolerance:.0%}")
        table.add_row(v.metric, f"{v.baseline:.4g}", f"{v.current:.4g}", _pct(v.change), allowed,
                      "[red]REGRESSED[/red]" if v.regressed else "ok")
    console.print(table)
    for note in notes:
        console.print(f"[yellow]note: the baseline differs in {escape(note)}[/yellow]", highlight=False)

"""Every `tgi_*` metric of TGIS (spec §4.7) in one table, exported in Prometheus text format on /metrics.

Values live in prometheus_client objects in a private registry; the exposition follows TGIS rather than
prometheus_client defaults: a metric appears only once recorded, every counter is emitted both as `name` and
`name_total`, no `_created` series, and the two histograms without configured buckets are summaries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

if TYPE_CHECKING:
    from runtime.engine.core import StepStats

COUNTER, GAUGE, HISTOGRAM, SUMMARY = "counter", "gauge", "histogram", "summary"

# name -> (kind, labels, bucket family); bucket families are resolved against the server limits in `Metrics`
METRICS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "tgi_request_count": (COUNTER, ("kind",), None),
    "tgi_request_input_count": (COUNTER, (), None),
    "tgi_request_failure": (COUNTER, ("err",), None),
    "tgi_request_success": (COUNTER, ("stop_reason", "kind"), None),
    "tgi_request_validation_duration": (HISTOGRAM, (), "duration"),
    "tgi_request_raw_input_length": (SUMMARY, (), None),
    "tgi_request_input_length": (HISTOGRAM, (), "sequence"),
    "tgi_request_max_new_tokens": (HISTOGRAM, (), "new_tokens"),
    "tgi_request_queue_duration": (HISTOGRAM, (), "duration"),
    "tgi_request_inference_duration": (HISTOGRAM, (), "duration"),
    "tgi_request_mean_time_per_token_duration": (HISTOGRAM, (), "duration"),
    "tgi_request_duration": (HISTOGRAM, (), "duration"),
    "tgi_request_generated_tokens": (HISTOGRAM, (), "new_tokens"),
    "tgi_request_total_tokens": (HISTOGRAM, (), "sequence"),
    "tgi_batch_concatenation_count": (COUNTER, (), None),
    "tgi_batch_inference_count": (COUNTER, ("method",), None),
    "tgi_batch_inference_success": (COUNTER, ("method",), None),
    "tgi_batch_inference_failure": (COUNTER, ("method", "reason"), None),
    "tgi_batch_inference_batch_size": (HISTOGRAM, ("method",), "batch_size"),
    "tgi_batch_inference_duration": (HISTOGRAM, ("method", "makeup"), "duration"),
    "tgi_batch_inference_forward_duration": (HISTOGRAM, ("method", "makeup"), "duration"),
    "tgi_batch_inference_tokproc_duration": (HISTOGRAM, ("method", "makeup"), "duration"),
    "tgi_batch_next_tokens": (SUMMARY, (), None),
    "tgi_batch_current_size": (GAUGE, (), None),
    "tgi_batch_input_tokens": (GAUGE, (), None),
    "tgi_batch_max_remaining_tokens": (GAUGE, (), None),
    "tgi_queue_size": (GAUGE, (), None),
    "tgi_queue_jump": (COUNTER, (), None),
    "tgi_granular_batch_addition": (COUNTER, (), None),
    "tgi_prefill_weight_limit_exceeded": (COUNTER, (), None),
    "tgi_prefill_padding_limit_exceeded": (COUNTER, (), None),
    "tgi_prompt_load_failure": (COUNTER, (), None),
    "tgi_prompt_load_duration": (HISTOGRAM, (), "duration"),
    "tgi_tokenize_request_count": (COUNTER, (), None),
    "tgi_tokenize_request_input_count": (COUNTER, (), None),
    "tgi_tokenize_request_tokens": (HISTOGRAM, (), "tokenize"),
    "tgi_tokenize_request_duration": (HISTOGRAM, (), "duration"),
    # ours, beside TGIS' (no name clash): prompt tokens looked up in the prefix cache, and those found computed
    "tgis_prefix_cache_queries": (COUNTER, (), None),
    "tgis_prefix_cache_hits": (COUNTER, (), None),
}

_KINDS = {COUNTER: Counter, GAUGE: Gauge, HISTOGRAM: Histogram, SUMMARY: Summary}


def buckets(max_sequence_length: int, max_new_tokens: int, max_batch_size: int) -> dict[str, list[float]]:
    """TGIS bucket layouts: geometric for durations, powers of two for tokenize, 64 linear steps for lengths."""
    return {
        "duration": [0.0001 * 1.5**k for k in range(1, 36)],
        "tokenize": [float(2**k) for k in range(6, 20)],
        "sequence": [max_sequence_length / 64 * i for i in range(1, 65)],
        "new_tokens": [max_new_tokens / 64 * i for i in range(1, 65)],
        "batch_size": [float(i) for i in range(1, max_batch_size + 1)],
    }


class Metrics:
    """Record with `inc` / `observe` / `set` by TGIS metric name; `render()` is the /metrics body.

    Thread-safe (the engine thread records batch metrics through `on_step`)."""

    def __init__(self, max_sequence_length: int, max_new_tokens: int, max_batch_size: int):
        self._registry = CollectorRegistry(auto_describe=True)
        layouts = buckets(max_sequence_length, max_new_tokens, max_batch_size)
        self._metrics = {}
        for name, (kind, labels, layout) in METRICS.items():
            extra = {"buckets": layouts[layout]} if layout else {}
            self._metrics[name] = _KINDS[kind](name, name, labels, registry=self._registry, **extra)
        self._recorded: set[str] = set()
        self._exposition = CollectorRegistry(auto_describe=False)
        self._exposition.register(self)

    def _child(self, name: str, labels: dict[str, str]):
        self._recorded.add(name)
        metric = self._metrics[name]
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._child(name, labels).inc(amount)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).observe(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).set(value)

    def collect(self):
        """prometheus_client collector protocol, reshaping the private registry to TGIS' exposition."""
        for family in self._registry.collect():
            if family.name not in self._recorded:
                continue
            samples = [s for s in family.samples if not s.name.endswith("_created")]
            if family.type == COUNTER:
                samples += [s._replace(name=family.name) for s in samples]
            family.samples = samples
            yield family

    def render(self) -> bytes:
        return generate_latest(self._exposition)

    def on_step(self, s: StepStats) -> None:
        """Engine step listener: the router-side batch metrics of spec §4.7 (called on the engine thread). A step
        that computed prompt chunks beside decodes is one forward: it counts as a prefill call. An "idle" step
        (work left the batch outside a step) only refreshes the gauges."""
        if s.method != "idle":
            self._on_forward(s)
        self.set("tgi_batch_current_size", s.running)
        self.set("tgi_batch_input_tokens", s.batch_input_tokens)
        self.set("tgi_batch_max_remaining_tokens", s.remaining_tokens)
        self.set("tgi_queue_size", s.queue_size)

    def _on_forward(self, s: StepStats) -> None:
        self.inc("tgi_batch_inference_count", method=s.method)
        self.observe("tgi_batch_inference_batch_size", s.batch_size, method=s.method)
        if s.ok:
            self.inc("tgi_batch_inference_success", method=s.method)
            makeup = {"method": s.method, "makeup": "single_only"}
            self.observe("tgi_batch_inference_duration", s.duration_s, **makeup)
            self.observe("tgi_batch_inference_forward_duration", s.forward_s, **makeup)
            self.observe("tgi_batch_inference_tokproc_duration", s.tokproc_s, **makeup)
        else:
            self.inc("tgi_batch_inference_failure", method=s.method, reason=s.failure_reason or "error")
        if s.method == "prefill":
            self.observe("tgi_batch_next_tokens", s.total_tokens)
        if s.concatenated:
            self.inc("tgi_batch_concatenation_count")
        for waited in s.queue_durations_s:
            self.observe("tgi_request_queue_duration", waited)
        if s.prefix_cache_queries:
            self.inc("tgis_prefix_cache_queries", s.prefix_cache_queries)
            self.inc("tgis_prefix_cache_hits", s.prefix_cache_hits)

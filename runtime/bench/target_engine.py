"""The in-process target: requests go straight to an engine front (`EngineFront.generate`), token ids as sampled."""

from __future__ import annotations

import itertools
from dataclasses import asdict, fields, replace

import torch

from runtime.bench.driver import RequestFailed, RequestRecord
from runtime.bench.prefix_cache import Counters
from runtime.bench.workload import BenchRequest
from runtime.engine.core import StepStats
from runtime.engine.guided_spec import guided_spec
from runtime.engine.request import EngineRequest, GenerationParams

# the engine counts prefix-cache lookups per step once it has a prefix cache; until then the hit rate is unknown
COUNTS_PREFIX_CACHE = {"prefix_cache_queries", "prefix_cache_hits"} <= {f.name for f in fields(StepStats)}


def generation_params(request: BenchRequest) -> GenerationParams:
    """The engine parameters of one request: its output length forced, except for a guided request (a JSON schema
    the output must follow), which must be able to stop when the schema is complete."""
    if request.guided is not None:
        return GenerationParams(max_new_tokens=request.output_len, guided=guided_spec("json_schema", request.guided))
    return GenerationParams(max_new_tokens=request.output_len, min_new_tokens=request.output_len)


class EngineTarget:
    """Benchmarks an engine front in this process; prefix-cache counters come from its step statistics."""

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()
        self._queries = self._hits = 0
        engine.add_step_listener(self._on_step)

    def _on_step(self, stats) -> None:
        self._queries += getattr(stats, "prefix_cache_queries", 0)
        self._hits += getattr(stats, "prefix_cache_hits", 0)

    async def __aenter__(self) -> EngineTarget:
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    def describe(self) -> dict:
        core = self.engine.core  # an AsyncEngine: the core and its model are in this process
        model, device = core.loaded.model, core.loaded.device
        module = type(model).__module__
        engines = {"transformers.": "transformers", "runtime.models.native.": "native"}
        return {
            "target": "engine",
            "engine": next((e for prefix, e in engines.items() if module.startswith(prefix)), module),
            "model_class": type(model).__name__,
            "dtype": str(core.loaded.dtype).removeprefix("torch."),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "tensor_parallel_size": core.config.tensor_parallel_size,
            "max_sequence_length": core.max_sequence_length,
            "engine_config": asdict(core.config),
        }

    def prepare(self, requests: list[BenchRequest]) -> list[tuple[list[int], GenerationParams]]:
        return [(r.prompt_ids, generation_params(r)) for r in requests]

    async def send(self, payload: tuple[list[int], GenerationParams], record: RequestRecord) -> None:
        ids, params = payload
        record.prompt_tokens = len(ids)
        async for out in self.engine.generate(EngineRequest(f"bench-{next(self._ids)}", ids, replace(params))):
            if out.error:
                raise RequestFailed(out.stop_reason.name, out.error)
            record.tokens(out.generated_token_count)

    async def prefix_cache(self) -> Counters:
        return (self._queries, self._hits) if COUNTS_PREFIX_CACHE else None


def cpu_name() -> str:
    """The host processor's model name (Linux), else its architecture."""
    import platform

    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()

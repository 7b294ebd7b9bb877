"""The one runner interface, and which runner serves a model.

A runner owns the model and its KV cache tensors and turns step plans into logits. `paged` runners count capacity
in KV blocks and continue prompts over several steps (`chunked_prefill`); the padded transformers runner counts
slots and prefills whole prompts. `failure` is set when the runner can no longer serve at all (a dead
tensor-parallel rank).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from runtime.engine.config import EngineConfig
from runtime.engine.plan import ModelOutput, StepPlan
from runtime.models.loader import LoadedModel

log = logging.getLogger(__name__)

class ModelRunner(Protocol):
    loaded: LoadedModel
    paged: bool
    chunked_prefill: bool
    failure: str | None

    def kv_capacity(self, config: EngineConfig, max_sequence_length: int) -> int:
        """Blocks (paged) or slots (padded) the KV cache holds; allocates them."""

    def check_adapter(self, ref) -> None:
        """At admission: ValueError (the client's message) when the LoRA adapter cannot be applied."""

    def execute(self, plan: StepPlan) -> ModelOutput: ...

    def close(self) -> None: ...


def choose_engine(config: EngineConfig) -> str:
    """"native" when asked for or when `auto` and the native models cover the architecture, else "transformers"
    (always for DeepSpeed tensor parallelism, which splits transformers models)."""
    from runtime.models.native import native_architecture

    if config.tensor_parallel_method == "deepspeed":
        if config.engine == "native" or config.kv_cache_dtype != "auto":
            raise ValueError("DeepSpeed tensor parallelism runs on the transformers engine, not the native one (nor "
                             "its fp8 KV cache)")
        return "transformers"

    model_config = json.loads((Path(config.model_path) / "config.json").read_text())
    reason = native_architecture(model_config)
    if config.engine == "native" and reason is not None:
        raise ValueError(f"the native engine cannot serve this model: {reason}")
    engine = config.engine
    if engine == "auto":
        if reason is not None:
            log.info("transformers engine: %s", reason)
        engine = "native" if reason is None else "transformers"
    if engine == "transformers" and config.kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype {config.kv_cache_dtype} needs the native engine; this model runs on the "
                         f"transformers engine ({reason or 'asked for'})")
    return engine


def make_runner(config: EngineConfig, loaded: LoadedModel | None = None) -> ModelRunner:
    """The runner for `config`; `loaded` (tests, scripts) is an already loaded transformers model."""
    if loaded is not None:
        from runtime.engine.hf_runner import TransformersRunner

        return TransformersRunner(loaded)
    engine = choose_engine(config)
    if config.tensor_parallel_size > 1:
        from runtime.parallel.executor import start_sharded

        return start_sharded(config, engine)
    return local_runner(config, engine)


def local_runner(config: EngineConfig, engine: str, shard: tuple[int, int] | None = None) -> ModelRunner:
    """A runner in this process (`shard`: this tensor-parallel rank's part of the model)."""
    if engine == "native":
        from runtime.engine.native_runner import NativeRunner
        from runtime.models.native.loader import load_native

        return NativeRunner(load_native(config, shard), config)
    from runtime.engine.hf_runner import TransformersRunner
    from runtime.models.loader import load_dummy_model, load_model

    if config.load_format == "dummy":
        if shard is not None:
            raise ValueError("random (dummy) weights are not split over ranks by the transformers engine")
        return TransformersRunner(load_dummy_model(config.model_path, config.dtype, config.device))
    return TransformersRunner(load_model(config.model_path, config.dtype, config.device, config.trust_remote_code,
                                         shard=shard, split=config.tensor_parallel_method))

"""Session-wide fixtures: offline mode, tiny models per architecture, the real SmolLM2 model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

import models as tiny_models  # noqa: E402
import triton_interpreter  # noqa: E402

HAS_TRITON = triton_interpreter.enable()

TINY = list(tiny_models.BUILDERS)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_root):
    """Factory: `tiny_model("llama")` → directory of that tiny model (built once per session)."""
    return lambda name: tiny_models.build(name, tiny_root)


@pytest.fixture(scope="session", params=TINY)
def any_tiny_model(request, tiny_model) -> tuple[str, Path]:
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The built-in default model (SmolLM2-135M-Instruct) as a safetensors directory, prepared once and cached."""
    from runtime.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture
def pair(tiny_model):
    """Factory: `pair(name, **options)` → (one-process engine, two-rank engine) of that tiny model. A process drives
    one sharded engine at a time (rank 0 owns the default process group), so each test shuts its pair down."""
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.config import EngineConfig

    made: list[AsyncEngine] = []

    def get(name: str, **cfg) -> tuple[AsyncEngine, AsyncEngine]:
        for tp in (1, 2):
            made.append(AsyncEngine(EngineConfig(model_path=str(tiny_model(name)), tensor_parallel_size=tp, **cfg)))
        return made[-2], made[-1]

    yield get
    for engine in made:
        engine.shutdown()

"""The CPU decode attention kernel (runtime/models/native/cpu_attention.py) against the plain-torch oracle, and the
engine's tokens with it."""

from __future__ import annotations

import pytest
import torch
from attention_cases import random_step
from engine_utils import request, run
from test_engine import MAX_NEW, PROMPTS

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.models.native import cpu_attention
from runtime.models.native.attention import TorchAttention
from runtime.models.native.cpu_attention import CpuAttention


def test_the_kernel_builds_here():
    """The machines this project runs on have g++: the kernel must really be in use, not silently skipped."""
    assert cpu_attention.library() is not None


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads, kv_heads, dim, block_size, window", [
    (8, 2, 32, 16, None),
    (9, 3, 64, 16, None),  # SmolLM2's heads
    (4, 4, 128, 32, None),  # no grouping, 32-token blocks
    (8, 1, 16, 16, 24),  # one KV head, sliding window
])
def test_decode_rows_match_the_torch_backend(dtype, tolerance, heads, kv_heads, dim, block_size, window):
    """Decode rows of 1-300 positions (partial first and last chunks, a window cutting into a block) beside prompt
    chunks, in one step; the kernel's output rows equal the oracle's within float32 (bfloat16) rounding, and the
    prompt rows are the oracle's own."""
    step = random_step([1, 5, 16, 17, 100, 300], [(30, 40), (0, 20)], seed=heads + dim, heads=heads,
                       kv_heads=kv_heads, dim=dim, block_size=block_size, cache_dtype=dtype, dtype=dtype)
    want, want_cache = step.run(TorchAttention(), window)
    got, got_cache = step.run(CpuAttention(), window)
    assert torch.equal(got_cache, want_cache)
    d = step.meta.num_decodes
    error = ((got[:d].float() - want[:d].float()).norm() / want[:d].float().norm()).item()
    assert error < tolerance, error
    assert torch.equal(got[d:], want[d:])


@pytest.mark.parametrize("dim, block_size", [(8, 16), (48, 16), (32, 8)])
def test_unsupported_shapes_fall_back_to_the_torch_path(dim, block_size):
    """A head size that is no multiple of the kernel's 16 lanes (8) or one it is not compiled for (48), a block
    shorter than its 16-position chunk: the oracle's path, bit for bit."""
    step = random_step([5, 40], [], seed=1, heads=4, kv_heads=2, dim=dim, block_size=block_size)
    assert torch.equal(step.run(CpuAttention(), None)[0], step.run(TorchAttention(), None)[0])


def test_engine_tokens_with_the_kernel(tiny_model):
    """Greedy tokens of prompts joining and leaving, in chunks, with the kernel (the CPU default) equal the
    plain-torch backend's, in float32. (In bfloat16 the backends round differently, the kernel once from a float32
    softmax, and a random tiny model's near-ties flip: the kernel-level test bounds that error.)"""
    path = str(tiny_model("llama"))
    tokens, backends = [], []
    for backend in ("auto", "torch"):
        engine = AsyncEngine(EngineConfig(model_path=path, engine="native", dtype="float32", max_batch_size=6,
                                          max_waiting_tokens=1, max_num_batched_tokens=16, debug_checks=True,
                                          attention_backend=backend))
        try:
            reqs = [request(engine, t, max_new_tokens=n) for t, n in zip(PROMPTS[:5], MAX_NEW[:5], strict=True)]
            tokens.append([r.token_ids for r in run(engine, reqs, join_after_steps=[0, 0, 1, 2, 4])])
            backends.append(type(engine.core.runner.backend))
        finally:
            engine.shutdown()
    assert backends == [CpuAttention, TorchAttention]
    assert tokens[0] == tokens[1]

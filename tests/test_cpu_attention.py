"""The CPU attention kernels (runtime/models/native/cpu_attention.py: decode rows, prompt chunks) against the
plain-torch oracle, and the engine's tokens with them."""

from __future__ import annotations

import pytest
import torch
from attention_cases import random_step
from engine_utils import request, run
from test_engine import MAX_NEW, PROMPTS

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.models.native.attention import TorchAttention
from runtime.models.native.cpu_attention import CpuAttention


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads, kv_heads, dim, block_size, window", [
    (8, 2, 32, 16, None),
    (9, 3, 64, 16, None),  # SmolLM2's heads
    (4, 4, 128, 32, None),  # no grouping, 32-token blocks
    (8, 1, 16, 16, 24),  # one KV head, sliding window
])
def test_rows_match_the_torch_backend(dtype, tolerance, heads, kv_heads, dim, block_size, window):
    """One step of decode rows of 1-300 positions (partial first and last chunks, a window cutting into a block)
    and prompt chunks (whole prompts of 1, 37 and 130 tokens: one, several and partial 64-key blocks, tiles of 8
    query rows cut anywhere; continuations of 40 tokens after 30 cached and 3 after 100): every row equals the
    oracle's within float32 (bfloat16) rounding, and the cache holds what the oracle writes."""
    step = random_step([1, 5, 16, 17, 100, 300], [(0, 37), (30, 40), (100, 3), (0, 1), (0, 130)], seed=heads + dim,
                       heads=heads, kv_heads=kv_heads, dim=dim, block_size=block_size, cache_dtype=dtype, dtype=dtype)
    want, want_cache = step.run(TorchAttention(), window)
    got, got_cache = step.run(CpuAttention(), window)
    assert torch.equal(got_cache, want_cache)
    d = step.meta.num_decodes
    assert _relative_error(got[:d], want[:d]) < tolerance
    for start, stop in zip(step.meta.query_start[d:-1].tolist(), step.meta.query_start[d + 1:].tolist(), strict=True):
        assert _relative_error(got[start:stop], want[start:stop]) < tolerance, (start, stop)
    assert not torch.equal(got[d:], want[d:])  # the prompt kernel ran: its rounding is not SDPA's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_queries_keys_values_as_views_of_one_projection(dtype):
    """The model hands the backend q, k and v as views of one fused QKV output (token stride heads + 2 KV heads):
    the rotary + cache-write kernel reads them in place and writes exactly what the oracle writes."""
    step = random_step([7, 33], [(0, 20), (16, 5)], seed=5, heads=9, kv_heads=3, dim=64, cache_dtype=dtype,
                       dtype=dtype)
    t = step.q.shape[0]
    fused = torch.cat([step.q.flatten(1), step.k.flatten(1), step.v.flatten(1)], dim=1)
    q, k, v = (x.view(t, -1, 64) for x in fused.split([9 * 64, 3 * 64, 3 * 64], dim=1))
    outs, caches = [], []
    for backend in (TorchAttention(), CpuAttention()):
        cache = step.cache.clone()
        outs.append(backend(q, k, v, step.cos, step.sin, cache, step.meta, 0.125, None))
        caches.append(cache)
    assert torch.equal(caches[0], caches[1])
    assert _relative_error(outs[1], outs[0]) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dim", [8, 48])
def test_unsupported_head_sizes_fall_back_to_the_torch_path(dim):
    """A head size that is no multiple of the kernels' 16 lanes (8) or one they are not compiled for (48): the
    oracle's path for every row, bit for bit."""
    step = random_step([5, 40], [(0, 9), (20, 7)], seed=1, heads=4, kv_heads=2, dim=dim)
    assert torch.equal(step.run(CpuAttention(), None)[0], step.run(TorchAttention(), None)[0])


def test_blocks_shorter_than_a_chunk():
    """8-token blocks: decode rows take the oracle's path bit for bit (the decode kernel reads 16-position chunks
    from one block); prompt chunks still go through the prompt kernel, which reads key by key."""
    step = random_step([5, 40], [(0, 9), (20, 7)], seed=1, heads=4, kv_heads=2, dim=32, block_size=8)
    got, want = step.run(CpuAttention(), None)[0], step.run(TorchAttention(), None)[0]
    d = step.meta.num_decodes
    assert torch.equal(got[:d], want[:d])
    assert _relative_error(got[d:], want[d:]) < 1e-6


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

"""The Triton attention kernels and the CUDA-graph decode path, run on the CPU through Triton's interpreter.

The plain-torch backend is the oracle: same rotary and cache writes, outputs within float32 rounding, and the
engine's tokens unchanged when the kernels (and the padded static-buffer path that CUDA graphs replay) replace it."""

from __future__ import annotations

import pytest
import torch
from attention_cases import random_step
from conftest import HAS_TRITON
from engine_utils import request, run
from test_engine import MAX_NEW, PROMPTS

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.models.native.attention import TorchAttention

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is a dev dependency (`make install` installs it)")

def _case(decodes: list[int], chunks: list[tuple[int, int]], window: int | None, splits: int | None, seed: int,
          cache_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32):
    """The Triton backend and the torch oracle on one random step (`attention_cases.random_step`)."""
    from runtime.models.native.triton_attention import TritonAttention

    step = random_step(decodes, chunks, seed, cache_dtype=cache_dtype, dtype=dtype, num_blocks=48, table_width=8)
    want, ref_cache = step.run(TorchAttention(), window)
    backend = TritonAttention(splits)
    got, got_cache = step.run(backend, window)
    again, _ = step.run(backend, window)  # as the next layer's launch
    assert torch.equal(again, got) and (backend.counts is None or not backend.counts.any()), "merge counts reset"
    return got, want, got_cache, ref_cache


@pytest.mark.parametrize("decodes, chunks, window, splits", [
    ([5, 17, 100, 128], [], None, None),
    ([3, 33, 90], [], None, 4),  # split-K: partial softmaxes merged by log-sum-exp; 1, 1 and 2 splits in use
    ([], [(0, 20)], None, None),
    ([], [(30, 40), (0, 70), (64, 1)], None, None),  # chunks after cached context, a one-token chunk
    ([9, 33], [(30, 40), (0, 70)], 24, None),  # sliding window
    ([9, 33], [(30, 40)], 24, 2),
])
def test_kernels_match_the_torch_backend(decodes, chunks, window, splits):
    got, want, got_cache, ref_cache = _case(decodes, chunks, window, splits, seed=len(decodes) + 7 * len(chunks))
    assert torch.equal(got_cache, ref_cache)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_kernels_read_a_float8_cache_as_the_torch_backend_does():
    """`--kv-cache-dtype fp8`: both backends store this step's keys and values rounded to float8 and read the cache
    back in the queries' type."""
    from runtime.models.native.attention import FP8

    got, want, got_cache, ref_cache = _case([5, 40, 100], [(30, 40), (0, 20)], None, 2, seed=3, cache_dtype=FP8)
    assert got_cache.dtype == FP8 and torch.equal(got_cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_bfloat16_queries_over_a_float8_cache_score_in_float16():
    """The GPU's case: bfloat16 queries, float8 cache; the kernels convert the cache (and the queries) to float16
    for their dot products, the torch backend reads the cache in bfloat16: same cache bytes, outputs within bfloat16
    rounding. The kernel rotates keys in float32 and rounds once, eager torch rounds each bfloat16 operation: a
    stored key may differ by one float8 step."""
    from runtime.models.native.attention import FP8

    got, want, got_cache, ref_cache = _case([5, 40, 100], [(30, 40), (0, 20)], None, 2, seed=5, cache_dtype=FP8,
                                            dtype=torch.bfloat16)
    same = (got_cache.view(torch.uint8) == ref_cache.view(torch.uint8)).float().mean().item()
    assert same > 0.99 and torch.allclose(got_cache.float(), ref_cache.float(), rtol=0.13, atol=2**-9)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_engine_tokens_with_triton_kernels_and_the_graph_decode_path(tiny_model):
    """Mixed prompt chunks and decodes through the kernels, and decode-only steps through the padded static buffers
    CUDA graphs replay (run eagerly here), with async scheduling as on a GPU (rows' last ids taken from the device
    tensor of the step before): the same tokens as the torch backend's synchronous loop."""
    from runtime.engine.cuda_graphs import DecodeGraphs

    path = str(tiny_model("llama"))
    common = dict(model_path=path, engine="native", max_batch_size=6, max_waiting_tokens=1,
                  max_num_batched_tokens=16, debug_checks=True)
    reqs = lambda engine: [request(engine, t, max_new_tokens=n)  # noqa: E731
                           for t, n in zip(PROMPTS[:5], MAX_NEW[:5], strict=True)]
    torch_engine = AsyncEngine(EngineConfig(attention_backend="torch", **common))
    triton_engine = AsyncEngine(EngineConfig(attention_backend="triton", async_scheduling=True, **common))
    try:
        runner = triton_engine.core.runner
        runner.graphs = DecodeGraphs(runner, 6, capture=False)
        decode_only = []
        triton_engine.add_step_listener(lambda s: decode_only.append(not s.prompt_rows))
        want = run(torch_engine, reqs(torch_engine), join_after_steps=[0, 0, 1, 2, 4])
        got = run(triton_engine, reqs(triton_engine), join_after_steps=[0, 0, 1, 2, 4])
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert any(decode_only) and not all(decode_only), "both paths ran"
        assert triton_engine.core.steps_ahead > 0
    finally:
        torch_engine.shutdown()
        triton_engine.shutdown()


@pytest.mark.parametrize("n, k, bias, dtype", [
    (24, 1024, False, torch.bfloat16),  # even: the kernel's unmasked loads
    (37, 700, True, torch.bfloat16),  # rows and inputs that do not fill the last tile
    (40, 1536, True, torch.float16),
])
def test_gemv_matches_a_float32_product(n, k, bias, dtype):
    """The batch-1 projection kernel: float32 accumulation, bias added before the one rounding."""
    from runtime.models.native.triton_gemv import gemv

    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(1, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    want = x.float() @ w.float().T + (b.float() if bias else 0)
    got = gemv(x, w, b)
    assert got.shape == (1, n) and got.dtype == dtype
    assert torch.equal(got, want.to(dtype)) or torch.allclose(got.float(), want, rtol=2**-7, atol=1e-2)
    assert (got.float() - want).abs().max().item() <= want.abs().max().item() * 2**-7


def _within_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Products of ~1,000 terms in bfloat16: the largest difference within 2⁻⁷ of the largest output (entries near
    zero after cancellation carry the others' rounding)."""
    return (got.float() - want.float()).abs().max().item() <= 2**-7 * want.float().abs().max().item()


@pytest.mark.parametrize("even", [True, False])
def test_gemv_computes_its_input_as_the_modules_do(even):
    """The kernel's prologue, RMSNorm of the input (qkv, gate_up: in float32 throughout), and its epilogues:
    silu(gate) · up of a gate-up product (rounded as the modules round) and the residual added to the scaled
    product (output, down)."""
    from runtime.models.native.layers import RMSNorm
    from runtime.models.native.triton_gemv import gemv

    n, k = (32, 1024) if even else (30, 700)
    g = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    norm = RMSNorm(k, 1e-5)
    norm.weight.data = torch.rand(k, generator=g).to(torch.bfloat16) + 0.5
    x = (torch.randn(1, k, generator=g) * 3).to(torch.bfloat16)
    want = (norm(x).float() @ w.float().T).to(torch.bfloat16)
    got = gemv(x, w, None, norm.weight, norm.eps)
    assert _within_rounding(got, want)
    b2 = torch.randn(n, generator=g).to(torch.bfloat16)
    gate, up = (x.float() @ w.float().T + b2.float()).to(torch.bfloat16).chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = gemv(x, w, b2, None, 0.0, True)
    assert got.shape == (1, n // 2) and _within_rounding(got, want)
    residual, b = torch.randn(1, n, generator=g).to(torch.bfloat16), torch.randn(n, generator=g).to(torch.bfloat16)
    for scale in (1.0, 0.22):  # Granite's residual multiplier
        y = (x.float() @ w.float().T + b.float()).to(torch.bfloat16)
        want = residual + (y if scale == 1.0 else y * scale)
        got = gemv(x, w, b, None, 0.0, False, residual, scale)
        assert _within_rounding(got, want)


def test_batch_one_decodes_through_the_gemv_kernel(tiny_model):
    """bfloat16 weights with the Triton backend: one-row decode steps take the GEMV kernel for every projection and
    the LM head, with the same greedy tokens as F.linear gives."""
    from runtime.models.native import triton_gemv

    path = str(tiny_model("llama"))
    common = dict(model_path=path, engine="native", dtype="bfloat16", attention_backend="triton", max_batch_size=2)
    engines = plain, fused = AsyncEngine(EngineConfig(**common)), AsyncEngine(EngineConfig(**common))
    projections = [[p for layer in e.core.runner.model.projections() for p in layer.values()]
                   + [e.core.runner.model.lm_head] for e in engines]
    calls = []
    for a, b in zip(*projections, strict=True):
        assert a.matvec is b.matvec is triton_gemv.gemv
        a.matvec, b.matvec = None, lambda *args: calls.append(1) or triton_gemv.gemv(*args)
    try:
        for prompt in PROMPTS[:2]:
            want = run(plain, [request(plain, prompt, max_new_tokens=6)])
            got = run(fused, [request(fused, prompt, max_new_tokens=6)])
            assert got[0].token_ids == want[0].token_ids and len(got[0].token_ids) == 6
        # per prompt 5 one-row steps through everything, and the LM head on the prompt step's one sampled row
        assert len(calls) == 2 * (5 * len(projections[1]) + 1)
    finally:
        plain.shutdown()
        fused.shutdown()

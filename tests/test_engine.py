"""The generation engine against transformers' own generate, under continuous batching."""

from __future__ import annotations

import time

import pytest
from engine_utils import engine_cache, hf_greedy, request, run

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.engine.request import StopReason

PROMPTS = [
    "Hello world, this is",
    "def f(x):\n    return",
    "A",
    "The quick brown fox jumps over the lazy dog and then",
    "import os\nimport sys\n\nclass Foo:",
    "Unicode: café naïve 中文",
    "for i in range(10):",
    "If the object is a class instance and the attribute reference",
    "x",
    "The built-in function",
]
MAX_NEW = [12, 5, 16, 9, 20, 7, 14, 3, 11, 18]


@pytest.fixture(scope="module")
def engines(tiny_model):
    yield from engine_cache(tiny_model)


ARCHS = ["llama", "gpt2", "gpt_neox", "gpt_bigcode", "t5"]


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_single_request_matches_transformers(engines, name):
    engine = engines(name)
    for text, n in zip(PROMPTS[:4], MAX_NEW[:4], strict=True):
        req = request(engine, text, max_new_tokens=n)
        [res] = run(engine, [req])
        ref = hf_greedy(engine, req.input_ids, n)
        assert res.token_ids == ref
        assert res.final.finished
        expected = StopReason.EOS_TOKEN if ref[-1] == engine.eos_token_id else StopReason.MAX_TOKENS
        assert res.final.stop_reason == expected
        assert res.final.generated_token_count == len(ref)


@pytest.mark.parametrize("name", ARCHS)
def test_batch_invariance_with_requests_joining_and_leaving(engines, name):
    """10 requests with different prompt lengths and budgets join a running batch at different steps."""
    engine = engines(name, max_batch_size=6, max_waiting_tokens=2)
    steps = []
    engine.add_step_listener(steps.append)
    reqs = [request(engine, t, max_new_tokens=n) for t, n in zip(PROMPTS, MAX_NEW, strict=True)]
    results = run(engine, reqs, join_after_steps=[0, 0, 1, 2, 3, 5, 6, 8, 9, 12])
    for req, res, n in zip(reqs, results, MAX_NEW, strict=True):
        assert res.token_ids == hf_greedy(engine, req.input_ids, n), req.request_id
    assert any(s.prompt_rows and s.decode_rows for s in steps), "requests joined a running batch"
    assert max(s.batch_size for s in steps) > 1


def test_kv_cache_exhaustion_preempts_and_completes(engines):
    """More concurrent work than the cache holds: everything completes, identical to running alone."""
    engine = engines("llama", max_batch_size=8, kv_cache_tokens=512, max_sequence_length=256)
    preemptions = []
    engine.add_step_listener(lambda s: preemptions.append(s.preempted))
    reqs = [request(engine, PROMPTS[i % len(PROMPTS)] * 3, max_new_tokens=60, min_new_tokens=60)
            for i in range(8)]
    results = run(engine, reqs)
    assert sum(preemptions) > 0, "the test must actually exhaust the cache"
    for req, res in zip(reqs, results, strict=True):
        assert res.final.stop_reason == StopReason.MAX_TOKENS
        assert res.token_ids == hf_greedy(engine, req.input_ids, 60, min_new_tokens=60)


def test_seeded_sampling_is_batch_invariant(engines):
    engine = engines("llama", max_waiting_tokens=1)
    params = dict(max_new_tokens=15, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    [alone] = run(engine, [request(engine, PROMPTS[0], **params)])
    busy = [request(engine, t, max_new_tokens=n, temperature=1.3, seed=i) for i, (t, n) in
            enumerate(zip(PROMPTS[1:8], MAX_NEW[1:8], strict=True))]
    target = request(engine, PROMPTS[0], **params)
    results = run(engine, [*busy, target], join_after_steps=[0, 0, 0, 1, 1, 2, 2, 3])
    assert results[-1].token_ids == alone.token_ids
    [other_seed] = run(engine, [request(engine, PROMPTS[0], **{**params, "seed": 99})])
    assert other_seed.token_ids != alone.token_ids


def test_time_limit_and_min_new_tokens(engines):
    engine = engines("gpt2")
    req = request(engine, PROMPTS[0], max_new_tokens=400, min_new_tokens=400,
                  deadline=time.monotonic() + 0.15)
    t0 = time.monotonic()
    [res] = run(engine, [req])
    assert res.final.stop_reason == StopReason.TIME_LIMIT
    assert 1 <= res.final.generated_token_count < 400
    assert time.monotonic() - t0 < 2.0


def test_expired_while_queued_gets_time_limit_without_tokens(engines):
    engine = engines("gpt2", max_batch_size=1)
    long = request(engine, PROMPTS[0], max_new_tokens=200, min_new_tokens=200)
    queued = request(engine, PROMPTS[1], max_new_tokens=5, deadline=time.monotonic() + 0.05)
    res_long, res_q = run(engine, [long, queued], join_after_steps=[0, 1])
    assert res_long.final.generated_token_count == 200
    assert res_q.final.stop_reason == StopReason.TIME_LIMIT
    assert res_q.final.generated_token_count == 0 and res_q.token_ids == []


def test_abort_frees_the_slot(engines):
    import asyncio

    engine = engines("llama", max_batch_size=1)

    async def main():
        gen = engine.generate(request(engine, PROMPTS[0], max_new_tokens=300, min_new_tokens=300))
        async for out in gen:
            if out.generated_token_count >= 3:
                break
        await gen.aclose()
        follow = request(engine, PROMPTS[1], max_new_tokens=4)
        outs = [o async for o in engine.generate(follow)]
        return follow, outs

    follow, outs = asyncio.run(asyncio.wait_for(main(), 30))
    assert [t for o in outs for t in o.new_token_ids] == hf_greedy(engine, follow.input_ids, 4)
    assert not engine.core.scheduler.running and not engine.core.scheduler.waiting


def test_stop_sequence_through_engine(engines):
    engine = engines("gpt2")
    base = request(engine, PROMPTS[3], max_new_tokens=12, min_new_tokens=12)
    [ref] = run(engine, [base])
    text = ref.final.output_text
    stop = text[3:7]
    assert stop and stop in text
    [res] = run(engine, [request(engine, PROMPTS[3], max_new_tokens=12, stop_sequences=[stop],
                                 include_stop_sequence=True)])
    assert res.final.stop_reason == StopReason.STOP_SEQUENCE and res.final.stop_sequence == stop
    assert res.final.output_text == text[: text.index(stop) + len(stop)]
    [excl] = run(engine, [request(engine, PROMPTS[3], max_new_tokens=12, stop_sequences=[stop],
                                  include_stop_sequence=False, stream=True)])
    assert excl.final.output_text == text[: text.index(stop)]
    assert excl.streamed_text == excl.final.output_text


@pytest.mark.slow
def test_smollm2_greedy_paris_and_parity(smollm2_dir):
    engine = AsyncEngine(EngineConfig(model_path=str(smollm2_dir), dtype="float32", max_waiting_tokens=1))
    try:
        prompts = ["The capital of France is", "Once upon a time,", "def fibonacci(n):"]
        budgets = [3, 10, 8]
        reqs = [request(engine, p, max_new_tokens=n) for p, n in zip(prompts, budgets, strict=True)]
        results = run(engine, reqs, join_after_steps=[0, 1, 3])
        assert results[0].final.output_text == " Paris.\n"  # tokens: ĠParis . Ċ
        for req, res, n in zip(reqs, results, budgets, strict=True):
            assert res.token_ids == hf_greedy(engine, req.input_ids, n)
            assert res.streamed_text == res.final.output_text
    finally:
        engine.shutdown()


def test_kv_capacity_below_one_request_is_refused(tiny_model):
    with pytest.raises(ValueError, match="kv_cache_tokens \\(100\\) must be at least one full request"):
        AsyncEngine(EngineConfig(model_path=str(tiny_model("llama")), kv_cache_tokens=100, max_sequence_length=256))

"""Async scheduling (step N+1 planned and launched before step N is read back) gives exactly what the synchronous
loop gives: the same tokens, text, stop reasons and token details for every kind of request, the same blocks back
in the pool, and failures that stay with their request. On the CPU the forward itself is synchronous, but the code
path is the one the GPU runs: rows whose last id is still a device tensor of the step before."""

from __future__ import annotations

import pytest
import torch
from engine_utils import break_sampling, cancellation_storm, engine_cache, hf_greedy, request, run
from test_engine import MAX_NEW, PROMPTS

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.guided_spec import guided_spec
from runtime.engine.request import StopReason

DETAILS = dict(generated_tokens=True, token_logprobs=True, token_ranks=True, top_n_tokens=3)


@pytest.fixture(scope="module")
def engines(tiny_model):
    yield from engine_cache(tiny_model, engine="native", debug_checks=True, max_batch_size=8, max_waiting_tokens=1,
                            max_num_batched_tokens=48)


def both(engines, name: str = "llama", **cfg) -> tuple[AsyncEngine, AsyncEngine]:
    sync, ahead = engines(name, async_scheduling=False, **cfg), engines(name, async_scheduling=True, **cfg)
    assert not sync.core.plan_ahead and ahead.core.plan_ahead
    return sync, ahead


def mixed_requests(engine: AsyncEngine) -> list:
    """Greedy, seeded sampling, penalties, stop sequences, min tokens, token and input details, EOS-able."""
    kinds = [dict(), dict(temperature=0.8, top_k=20, top_p=0.9, seed=7), dict(repetition_penalty=1.3),
             dict(length_penalty=(2, 1.5), temperature=0.7, seed=3), dict(min_new_tokens=9, **DETAILS),
             dict(stop_sequences=[" the", "e"], include_stop_sequence=False), dict(input_tokens=True, **DETAILS),
             dict(typical_p=0.5, temperature=1.2, seed=11), dict(max_is_token_limit=True)]
    return [request(engine, PROMPTS[i % len(PROMPTS)] + " more" * (i // 10), max_new_tokens=MAX_NEW[i % 10] + i % 4,
                    **kinds[i % len(kinds)]) for i in range(18)]


def outcome(result) -> tuple:
    """Everything a client sees, logprobs apart (`logprobs`)."""
    final = result.final
    return (result.token_ids, result.streamed_text, final.output_text, final.stop_reason, final.stop_sequence,
            final.generated_token_count, final.error,
            [(d.token_id, d.rank, [t.token_id for t in d.top_tokens or ()]) for o in result.outputs for d in o.tokens],
            [d.token_id for o in result.outputs for d in o.input_tokens or ()])


def logprobs(result) -> list[float]:
    """Generated and input tokens' logprobs, top tokens' included (NaN: the first input token's)."""
    return [lp if lp is not None else 0.0 for o in result.outputs
            for d in [*o.tokens, *(o.input_tokens or ())]
            for lp in [d.logprob, *(t.logprob for t in d.top_tokens or ())]]


def same_outcomes(sync: AsyncEngine, ahead: AsyncEngine, make, joins: list[int] | None = None) -> list:
    """Batches are composed differently in the two loops: float32 logprobs may then differ in the last bits."""
    expected = run(sync, make(sync), join_after_steps=joins)
    before = ahead.core.steps_ahead
    got = run(ahead, make(ahead), join_after_steps=joins)
    assert [outcome(r) for r in got] == [outcome(r) for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(torch.tensor(logprobs(a)), torch.tensor(logprobs(b)), atol=1e-5, equal_nan=True)
    assert ahead.core.steps_ahead > before, "steps were planned while the one before was in flight"
    return got


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_every_kind_of_request_gets_what_the_synchronous_loop_gives(engines, name):
    sync, ahead = both(engines, name)
    joins = [0, 0, 0, 1, 2, 3, 3, 5, 6, 8, 9, 12, 13, 15, 18, 20, 21, 25]
    got = same_outcomes(sync, ahead, mixed_requests, joins)
    assert {r.final.stop_reason for r in got} >= {StopReason.MAX_TOKENS, StopReason.STOP_SEQUENCE,
                                                  StopReason.TOKEN_LIMIT}
    assert ahead.core.kv.num_free == ahead.core.kv.num_blocks - 1


def test_greedy_equals_transformers_with_requests_joining(engines):
    _, ahead = both(engines)
    steps, ahead_before = ahead.core.steps, ahead.core.steps_ahead
    reqs = [request(ahead, PROMPTS[i % 10], max_new_tokens=MAX_NEW[i % 10] + i % 3) for i in range(12)]
    results = run(ahead, reqs, join_after_steps=[0, 0, 1, 2, 2, 4, 5, 7, 9, 10, 14, 17])
    for req, res in zip(reqs, results, strict=True):
        assert res.token_ids == hf_greedy(ahead, req.input_ids, req.params.max_new_tokens), req.request_id
    launched, planned_ahead = ahead.core.steps - steps, ahead.core.steps_ahead - ahead_before
    assert planned_ahead >= launched * 3 // 4, (planned_ahead, launched)


def test_logprobs_and_ranks_keep_async_scheduling_top_n_tokens_do_not(engines):
    """Token logprobs and ranks are queued with the ids; top-n tokens come from the step's scores when it is read
    back: planned ahead, every stream would wait a step longer, so such steps are read back first."""
    sync, ahead = both(engines)
    for details, planned in ((dict(generated_tokens=True, token_logprobs=True, token_ranks=True), True),
                             (DETAILS, False)):
        before = ahead.core.steps_ahead
        [got] = run(ahead, [request(ahead, PROMPTS[0], max_new_tokens=10, **details)])
        [want] = run(sync, [request(sync, PROMPTS[0], max_new_tokens=10, **details)])
        assert outcome(got) == outcome(want) and logprobs(got) == logprobs(want)
        assert all(d.logprob is not None and d.rank >= 1 for o in got.outputs for d in o.tokens)
        assert (ahead.core.steps_ahead > before) == planned


def test_prefix_cache_hits_and_preemption_under_async_scheduling(engines):
    sync, ahead = both(engines, kv_cache_tokens=512, max_sequence_length=256)
    shared = PROMPTS[3] * 4

    def make(engine):
        return [request(engine, shared + PROMPTS[i % 10], max_new_tokens=50, min_new_tokens=50) for i in range(8)]

    preempted = []
    ahead.add_step_listener(lambda s: preempted.append(s.preempted))
    try:
        same_outcomes(sync, ahead, make)
    finally:
        ahead.listeners.pop()
    assert sum(preempted) > 0, "the cache must actually run out"
    hits = ahead.core.kv.counters.hits
    again = run(ahead, make(ahead)[:2])  # cached blocks of the first run
    assert ahead.core.kv.counters.hits > hits
    assert [r.token_ids for r in again] == [hf_greedy(ahead, r.input_ids, 50, min_new_tokens=50)
                                            for r in make(ahead)[:2]]


def test_guided_rows_wait_for_their_tokens_and_match(engines):
    sync, ahead = both(engines)
    spec = guided_spec("choice", ["yes please", "no thanks", "maybe later"])

    def make(engine):
        return [request(engine, PROMPTS[i], max_new_tokens=20, guided=spec if i % 2 else None) for i in range(6)]

    got = same_outcomes(sync, ahead, make)
    assert all(r.final.output_text in spec.value for r in got[1::2])


def test_a_row_that_breaks_sampling_fails_alone(engines, monkeypatch):
    _, ahead = both(engines)
    break_sampling(monkeypatch)
    bad = request(ahead, PROMPTS[2], max_new_tokens=8, temperature=0.9, top_k=13, seed=1)
    good = [request(ahead, t, max_new_tokens=8) for t in PROMPTS[3:6]]
    results = run(ahead, [bad, *good])
    assert results[0].final.stop_reason == StopReason.ERROR and "sampling failed" in results[0].final.error
    for req, res in zip(good, results[1:], strict=True):
        assert res.final.error is None and res.token_ids == hf_greedy(ahead, req.input_ids, 8)


def test_cancellations_while_a_step_is_in_flight_return_every_block(engines):
    _, ahead = both(engines, max_batch_size=12, prefix_caching=False)
    cancellation_storm(ahead, PROMPTS, streams=30, seed=1, max_stop=8)
    core = ahead.core
    core.kv.check([])
    assert core.kv.num_free == core.kv.num_blocks - 1
    assert not core.runner.states, "every sequence's runner row was released"

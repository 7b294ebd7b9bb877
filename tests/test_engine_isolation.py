"""What a request does to the engine stays with that request (issue 17's engine findings): numeric edge cases are
computed safely, a row that breaks sampling fails alone, bad inputs fail at admission, and the engine's state is
true at rest (gauges after an abort, nothing left running after a shutdown)."""

from __future__ import annotations

import asyncio
import time

import pytest
from engine_utils import break_sampling, hf_greedy, request, run
from test_engine import PROMPTS

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.engine.request import EngineRequest, GenerationParams, StopReason


@pytest.fixture(scope="module", params=["native", "transformers"])
def engine(request, tiny_model):
    eng = AsyncEngine(EngineConfig(model_path=str(tiny_model("llama")), engine=request.param, max_batch_size=8,
                                   max_waiting_tokens=1))
    yield eng
    eng.shutdown()


def test_a_huge_length_penalty_ends_its_request_with_eos_and_leaves_others_alone(engine):
    """decay 10 from token 0 (the sampler test covers 10^p past the float range)."""
    bystander = request(engine, PROMPTS[1], max_new_tokens=12)
    penalised = request(engine, PROMPTS[0], max_new_tokens=400, length_penalty=(0, 10.0), temperature=0.7, seed=3)
    results = run(engine, [penalised, bystander])
    assert results[0].final.error is None and results[0].final.stop_reason == StopReason.EOS_TOKEN
    assert results[1].token_ids == hf_greedy(engine, bystander.input_ids, 12)


def test_a_row_that_breaks_sampling_fails_alone(engine, monkeypatch):
    break_sampling(monkeypatch)
    bad = request(engine, PROMPTS[2], max_new_tokens=8, temperature=0.9, top_k=13, seed=1)
    good = [request(engine, t, max_new_tokens=8) for t in PROMPTS[3:6]]
    results = run(engine, [bad, *good])
    assert results[0].final.stop_reason == StopReason.ERROR
    assert "sampling failed" in results[0].final.error
    for req, res in zip(good, results[1:], strict=True):
        assert res.final.error is None and res.token_ids == hf_greedy(engine, req.input_ids, 8)


def test_an_empty_input_fails_at_admission_alone(engine):
    empty = EngineRequest("empty", [], GenerationParams(max_new_tokens=4))
    good = request(engine, PROMPTS[0], max_new_tokens=4)
    results = run(engine, [empty, good])
    assert results[0].final.stop_reason == StopReason.ERROR and "no tokens" in results[0].final.error
    assert results[1].token_ids == hf_greedy(engine, good.input_ids, 4)


def test_a_tiny_time_limit_on_an_idle_engine_still_gives_the_first_token(engine):
    req = request(engine, PROMPTS[0], max_new_tokens=50, deadline=time.monotonic() + 0.001)
    [res] = run(engine, [req])
    assert res.final.stop_reason == StopReason.TIME_LIMIT and res.final.generated_token_count >= 1


def test_gauges_are_true_at_rest_after_an_abort(engine):
    seen = []
    engine.add_step_listener(seen.append)

    async def abandon() -> None:
        gen = engine.generate(request(engine, PROMPTS[0], max_new_tokens=300, min_new_tokens=300))
        async for out in gen:
            if out.generated_token_count >= 2:
                break
        await gen.aclose()
        for _ in range(200):
            if seen and seen[-1].running == 0 and seen[-1].method == "idle":
                return
            await asyncio.sleep(0.01)

    try:
        asyncio.run(asyncio.wait_for(abandon(), 60))
    finally:
        engine.listeners.remove(seen.append)
    assert seen[-1].method == "idle" and seen[-1].running == 0 and seen[-1].queue_size == 0


def test_shutdown_drops_work_nobody_waits_for(tiny_model):
    eng = AsyncEngine(EngineConfig(model_path=str(tiny_model("llama")), engine="native"))

    async def start_and_leave() -> None:
        gen = eng.generate(request(eng, PROMPTS[0], max_new_tokens=400, min_new_tokens=400))
        await gen.__anext__()

    asyncio.run(start_and_leave())
    started = time.monotonic()
    eng.shutdown()
    assert time.monotonic() - started < 10
    assert not eng.core.scheduler.running and not eng.core.scheduler.waiting


def test_a_broken_adapter_fails_its_request_alone(engine, tmp_path):
    """The front end checks that the files exist; weights that cannot be read fail at admission, not in a step."""
    import json as _json

    from runtime.engine.lora import LoraRef

    folder = tmp_path / f"broken-{engine.core.runner.paged}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(_json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    broken = request(engine, PROMPTS[0], max_new_tokens=6)
    broken.lora = LoraRef("broken", str(folder))
    good = request(engine, PROMPTS[1], max_new_tokens=6)
    results = run(engine, [broken, good])
    assert results[0].final.stop_reason == StopReason.ERROR and "can't load adapter 'broken'" in results[0].final.error
    assert results[1].token_ids == hf_greedy(engine, good.input_ids, 6)


def test_input_token_details_that_fail_fail_their_request_alone(engine, monkeypatch):
    import runtime.engine.core as core

    original = core.input_token_details

    def fragile(logits, ids, params, start=0):
        if params.top_n_tokens == 7:  # stands for any input whose scoring raises
            raise RuntimeError("boom")
        return original(logits, ids, params, start=start)

    monkeypatch.setattr(core, "input_token_details", fragile)
    bad = request(engine, PROMPTS[2], max_new_tokens=5, input_tokens=True, top_n_tokens=7)
    good = [request(engine, t, max_new_tokens=5, input_tokens=True) for t in PROMPTS[3:5]]
    results = run(engine, [bad, *good])
    assert results[0].final.stop_reason == StopReason.ERROR and "scoring the input tokens" in results[0].final.error
    for req, res in zip(good, results[1:], strict=True):
        assert res.final.error is None and res.token_ids == hf_greedy(engine, req.input_ids, 5)
        [details] = [o.input_tokens for o in res.outputs if o.input_tokens]
        assert [t.token_id for t in details] == req.input_ids


def test_a_failed_forward_gives_back_the_runner_rows_it_took(tiny_model, monkeypatch):
    """The native runner takes a batch row for a new sequence before its forward; a forward that raises must not
    keep it, or a long-running server runs out of rows."""
    from runtime.engine.native_runner import NativeRunner

    eng = AsyncEngine(EngineConfig(model_path=str(tiny_model("llama")), engine="native", max_batch_size=4))
    try:
        original, calls = NativeRunner._forward, []

        def fails_once(self, plan, states):
            calls.append(len(plan.rows))
            if len(calls) == 1:
                raise RuntimeError("device fault")
            return original(self, plan, states)

        monkeypatch.setattr(NativeRunner, "_forward", fails_once)
        failed = run(eng, [request(eng, t, max_new_tokens=4) for t in PROMPTS[:4]])
        assert all(r.final.stop_reason == StopReason.ERROR for r in failed)
        later = [request(eng, t, max_new_tokens=4) for t in PROMPTS[:4]]  # need every row back
        for req, res in zip(later, run(eng, later), strict=True):
            assert res.final.error is None and res.token_ids == hf_greedy(eng, req.input_ids, 4)
        runner = eng.core.runner  # at rest: every row is free or waits for the release the next plan carries
        assert set(runner.states) == set(eng.core.released)
        assert sorted(runner.free_rows + [s.row for s in runner.states.values()]) == [0, 1, 2, 3]
    finally:
        eng.shutdown()

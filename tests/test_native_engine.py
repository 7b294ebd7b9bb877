"""The native paged engine against transformers, and what its scheduler and KV cache do, seen through step stats.

References are transformers' own `generate` / forward on the same checkpoint in float32. Every engine here checks
the KV block invariants after each step (`debug_checks`)."""

from __future__ import annotations

import pytest
import torch
from engine_utils import cancellation_storm, engine_cache, hf_greedy, reference_model, request, run
from lora_utils import write_lora
from models import NATIVE
from test_engine import MAX_NEW, PROMPTS

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.engine.lora import LoraRef
from runtime.engine.native_runner import NativeRunner
from runtime.engine.request import StopReason
from runtime.models.prefixes import PromptPrefix


@pytest.fixture(scope="module")
def engines(tiny_model):
    yield from engine_cache(tiny_model, engine="native", debug_checks=True)


def record_steps(engine: AsyncEngine) -> list:
    steps: list = []
    engine.add_step_listener(steps.append)
    return steps


def blocks_all_free(engine: AsyncEngine) -> bool:
    kv = engine.core.kv
    kv.check([])
    return kv.num_free == kv.num_blocks - 1


SIXTEEN = [(PROMPTS[i % 10] + (" again" * (i // 10)), MAX_NEW[i % 10] + i % 3) for i in range(16)]


@pytest.mark.parametrize("name", NATIVE)
def test_native_greedy_equals_transformers_alone_and_with_16_joining(engines, name):
    engine = engines(name, max_batch_size=6, max_waiting_tokens=2, max_num_batched_tokens=24)
    assert isinstance(engine.core.runner, NativeRunner)
    for text, n in SIXTEEN[:3]:
        req = request(engine, text, max_new_tokens=n)
        [res] = run(engine, [req])
        assert res.token_ids == hf_greedy(engine, req.input_ids, n)
    steps = record_steps(engine)
    reqs = [request(engine, t, max_new_tokens=n) for t, n in SIXTEEN]
    results = run(engine, reqs, join_after_steps=[0, 0, 0, 1, 2, 3, 3, 5, 6, 8, 9, 12, 13, 15, 18, 20])
    for req, res in zip(reqs, results, strict=True):
        assert res.token_ids == hf_greedy(engine, req.input_ids, req.params.max_new_tokens), req.request_id
    assert any(s.prompt_rows and s.decode_rows for s in steps), "requests joined a running batch"
    assert max(s.batch_size for s in steps) > 1
    assert blocks_all_free(engine)  # cached blocks stay, unreferenced (evictable)


def _hf_logprobs(engine: AsyncEngine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = reference_model(engine)(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1)


@pytest.mark.parametrize("name", NATIVE)
def test_native_logits_match_transformers(engines, name):
    """Input-token logprobs (raw logits at every prompt position) and generated-token logprobs within 1e-4."""
    engine = engines(name, max_num_batched_tokens=16)  # the prompt is computed in chunks
    req = request(engine, PROMPTS[3] + " " + PROMPTS[7], max_new_tokens=6, input_tokens=True,
                  generated_tokens=True, token_logprobs=True)
    [res] = run(engine, [req])
    full = req.input_ids + res.token_ids
    ref = _hf_logprobs(engine, full)
    got_in = [d.logprob for d in res.outputs[0].input_tokens][1:]
    want_in = [ref[i - 1, t].item() for i, t in enumerate(req.input_ids) if i]
    assert torch.allclose(torch.tensor(got_in), torch.tensor(want_in), atol=1e-4)
    got_gen = [d.logprob for o in res.outputs for d in o.tokens]
    n = len(req.input_ids)
    want_gen = [ref[n - 1 + i, t].item() for i, t in enumerate(res.token_ids)]
    assert torch.allclose(torch.tensor(got_gen), torch.tensor(want_gen), atol=1e-4)


def _details(res) -> list[float]:
    return [d.logprob for o in res.outputs for d in [*(o.input_tokens or []), *o.tokens]]


def test_chunked_prefill_on_and_off_give_the_same_tokens_and_logprobs(engines):
    long = " ".join(PROMPTS) * 2
    params = dict(max_new_tokens=10, input_tokens=True, generated_tokens=True, token_logprobs=True)
    whole = engines("llama", chunked_prefill=False)
    chunked = engines("llama", max_num_batched_tokens=16)
    steps = record_steps(chunked)
    [a] = run(whole, [request(whole, long, **params)])
    [b] = run(chunked, [request(chunked, long, **params)])
    assert b.token_ids == a.token_ids
    assert torch.allclose(torch.tensor(_details(b)), torch.tensor(_details(a)), atol=1e-5, equal_nan=True)
    assert sum(1 for s in steps if s.prompt_rows) > 1, "the prompt really was split over steps"


def test_prefix_cache_hit_gives_what_a_miss_gives(engines):
    engine = engines("llama", max_num_batched_tokens=32)
    cold = engines("llama", max_num_batched_tokens=32, prefix_caching=False)
    shared = " ".join(PROMPTS)  # well over two blocks
    params = dict(max_new_tokens=12, generated_tokens=True, token_logprobs=True)
    steps = record_steps(engine)
    [first] = run(engine, [request(engine, shared + " first", **params)])
    miss_hits = sum(s.prefix_cache_hits for s in steps)
    steps.clear()
    [again] = run(engine, [request(engine, shared + " first", **params)])
    [other] = run(engine, [request(engine, shared + " second one", **params)])
    hits = sum(s.prefix_cache_hits for s in steps)
    [other_cold] = run(cold, [request(cold, shared + " second one", **params)])
    assert hits >= 2 * engine.core.config.block_size and miss_hits == 0
    assert again.token_ids == first.token_ids and other.token_ids == other_cold.token_ids
    assert torch.allclose(torch.tensor(_details(again)), torch.tensor(_details(first)), atol=1e-5)
    assert torch.allclose(torch.tensor(_details(other)), torch.tensor(_details(other_cold)), atol=1e-5)
    # a request that asks for input-token details computes every prompt position, hit or not
    [detailed] = run(engine, [request(engine, shared + " first", max_new_tokens=3, input_tokens=True,
                                      token_logprobs=True)])
    assert len(detailed.outputs[0].input_tokens) == len(request(engine, shared + " first").input_ids)


def test_preemption_and_recomputation_give_the_same_tokens(engines):
    engine = engines("llama", max_batch_size=8, kv_cache_tokens=512, max_sequence_length=256)
    steps = record_steps(engine)
    reqs = [request(engine, PROMPTS[i % len(PROMPTS)] * 3, max_new_tokens=60, min_new_tokens=60) for i in range(8)]
    results = run(engine, reqs)
    assert sum(s.preempted for s in steps) > 0, "the test must actually exhaust the cache"
    for req, res in zip(reqs, results, strict=True):
        assert res.final.stop_reason == StopReason.MAX_TOKENS
        assert res.token_ids == hf_greedy(engine, req.input_ids, 60, min_new_tokens=60)
    engine.core.kv.check([])


def test_cancellation_storm_returns_every_block(engines):
    engine = engines("llama", max_batch_size=12, max_num_batched_tokens=32, prefix_caching=False)
    cancellation_storm(engine, PROMPTS, streams=40, seed=0, max_stop=6)
    assert blocks_all_free(engine)


def test_a_long_prompt_never_holds_running_streams_back_more_than_one_chunk_step(engines):
    budget = 16
    engine = engines("llama", max_batch_size=8, max_waiting_tokens=1, max_num_batched_tokens=budget)
    steps = record_steps(engine)
    streams = [request(engine, PROMPTS[i], max_new_tokens=60, min_new_tokens=60) for i in range(3)]
    long = request(engine, " ".join(PROMPTS) * 3, max_new_tokens=2)
    results = run(engine, [*streams, long], join_after_steps=[0, 0, 0, 12])
    assert all(r.final.generated_token_count == 60 for r in results[:3])
    all_running = next(i for i, s in enumerate(steps) if s.decode_rows == 3)  # the three streams decode
    chunk_steps = [s for s in steps[all_running:] if s.prompt_rows]  # from then on only the long prompt prefills
    assert len(chunk_steps) >= len(long.input_ids) // budget, "the long prompt was prefilled in chunks"
    for s in chunk_steps:
        assert s.scheduled_tokens <= budget
        assert s.decode_rows == 3, "every running stream got its token in the chunk step"


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    write_lora(root / "one", base, ["q_proj", "v_proj"], 1)
    write_lora(root / "two", base, ["gate_proj", "down_proj", "o_proj"], 2)
    return root


def test_lora_and_prompt_prefix_rows_match_the_transformers_runner(engines, tiny_model, adapters):
    native = engines("llama", max_batch_size=8, max_waiting_tokens=1, max_num_batched_tokens=16)
    hf = AsyncEngine(EngineConfig(model_path=str(tiny_model("llama")), engine="transformers", max_batch_size=8,
                                  max_waiting_tokens=1))
    try:
        prefix = PromptPrefix(torch.randn(5, 64, generator=torch.Generator().manual_seed(4)) * 0.5, None,
                              native.core.loaded.pad_token_id, False, "tuned")

        def batch(engine):
            reqs = [request(engine, t, max_new_tokens=n) for t, n in zip(PROMPTS[:8], MAX_NEW[:8], strict=True)]
            for r, name in zip(reqs, ["one", None, "two", "one", None, "two", None, None], strict=True):
                r.lora = LoraRef(name, str(adapters / name)) if name else None
            reqs[4].prefix = reqs[6].prefix = prefix
            return reqs

        want = run(hf, batch(hf), join_after_steps=[0, 0, 1, 1, 2, 3, 3, 4])
        got = run(native, batch(native), join_after_steps=[0, 0, 1, 1, 2, 3, 3, 4])
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
    finally:
        hf.shutdown()


def test_engine_choice(tiny_model):
    from runtime.config import ServerConfig
    from runtime.engine.runner import choose_engine

    assert choose_engine(EngineConfig(model_path=str(tiny_model("qwen3")))) == "native"
    assert choose_engine(EngineConfig(model_path=str(tiny_model("gpt2")))) == "transformers"
    assert choose_engine(EngineConfig(model_path=str(tiny_model("llama")), engine="transformers")) == "transformers"
    with pytest.raises(ValueError, match="no native model for model_type 'gpt2'"):
        choose_engine(EngineConfig(model_path=str(tiny_model("gpt2")), engine="native"))
    assert ServerConfig(deployment_framework="hf_transformers").effective_engine == "transformers"
    assert ServerConfig(deployment_framework="tgis_native").effective_engine == "native"
    assert ServerConfig(engine="native", deployment_framework="hf_transformers").effective_engine == "native"
    with pytest.raises(ValueError, match="kv_cache_dtype fp8 needs the native engine"):
        choose_engine(EngineConfig(model_path=str(tiny_model("gpt2")), kv_cache_dtype="fp8"))


def test_the_gpu_warm_up_leaves_nothing_behind(tiny_model):
    """On CUDA the runner runs prompt-only, mixed and continued-chunk steps before serving (first-use JIT compiles);
    here on the CPU: afterwards no row, block or value of it remains and outputs are transformers'."""
    eng = AsyncEngine(EngineConfig(model_path=str(tiny_model("llama")), engine="native", debug_checks=True))
    try:
        runner = eng.core.runner
        rows, forward, kinds = sorted(runner.free_rows), runner._forward, []

        def counted(plan, states):
            kinds.append((sum(r.is_decode for r in plan.rows), sum(not r.is_decode for r in plan.rows)))
            return forward(plan, states)

        runner._forward = counted
        runner.warm_up()  # as at the end of kv_capacity on CUDA; the engine thread waits for requests
        del runner._forward
        assert kinds == [(0, 4), (3, 2), (4, 1)]  # prompt-only, then mixed with 3 and 4 decode rows
        assert not runner.states and sorted(runner.free_rows) == rows
        assert not runner.caches[:, :, :16].any()  # the null block and blocks 1-15 it used are zero again
        reqs = [request(eng, t, max_new_tokens=6) for t in PROMPTS[:3]]
        assert [r.token_ids for r in run(eng, reqs)] == [hf_greedy(eng, r.input_ids, 6) for r in reqs]
    finally:
        eng.shutdown()


def test_cpu_decode_attention_groups_rows_of_similar_length():
    """TorchAttention pads each group of decode rows to its own longest context, not the batch's; every row once."""
    from runtime.models.native.attention import _length_groups

    lengths = [700, 40, 690, 300, 35, 520, 12, 5]
    groups = _length_groups(lengths)
    assert groups == [([0, 2, 5], 700), ([3], 300), ([1, 4], 40), ([6, 7], 12)]
    assert sorted(i for rows, _ in groups for i in rows) == list(range(len(lengths)))
    assert len(_length_groups([1000 // 2**i for i in range(10)])) == 4  # at most four kernels per layer
    assert _length_groups([]) == []


def test_an_fp8_kv_cache_holds_four_times_the_float32_tokens_and_still_says_paris(smollm2_dir):
    """`--kv-cache-dtype fp8`: one byte per key and value element; SmolLM2's greedy answer is unchanged and its
    logprobs move by rounding only."""
    def answer(kv_cache_dtype: str):
        engine = AsyncEngine(EngineConfig(model_path=str(smollm2_dir), engine="native", dtype="float32",
                                          kv_cache_dtype=kv_cache_dtype, max_batch_size=4, debug_checks=True))
        try:
            req = request(engine, "The capital of France is", max_new_tokens=8, generated_tokens=True,
                          token_logprobs=True)
            [res] = run(engine, [req])
            runner = engine.core.runner
            return ((runner.caches.dtype, runner._block_bytes()), res.final.output_text,
                    [d.logprob for o in res.outputs for d in o.tokens])
        finally:
            engine.shutdown()

    (dtype, block_bytes), text, logprobs = answer("auto")
    (dtype8, block_bytes8), text8, logprobs8 = answer("fp8")
    assert (dtype, dtype8) == (torch.float32, torch.float8_e4m3fn) and block_bytes == 4 * block_bytes8
    assert text8 == text and text.startswith(" Paris.")
    assert torch.allclose(torch.tensor(logprobs8), torch.tensor(logprobs), atol=0.15)

"""Tensor parallelism with 2 CPU processes (gloo): the same results as one process, and a dead rank stops the server.

Every test that starts ranks has a hard timeout (pytest-timeout, plus per-call deadlines)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest
import torch
from engine_utils import request, run, transformers_greedy_texts
from server_harness import running_server
from test_engine import MAX_NEW, PROMPTS

from proto import generation_pb2 as pb
from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.engine.guided_spec import guided_spec
from runtime.engine.request import StopReason
from runtime.models.prefixes import PromptPrefix
from runtime.parallel.rules import Rule, ShardingError, plan, rule_for
from runtime.parallel.sharding import shard_checkpoint

T = 120
SMOLLM2 = {"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
           "intermediate_size": 1536}


def test_rules_split_gqa_head_groups_unevenly():
    p = plan(SMOLLM2, 2, 49152)
    assert p.sizes("q") == [6 * 64, 3 * 64]  # each rank keeps the 3 query heads of each of its KV heads
    assert p.sizes("kv") == [2 * 64, 1 * 64] and (p.q_heads, p.kv_heads) == ([6, 3], [2, 1])
    assert p.sizes("mlp") == [768, 768] and p.sizes("vocab") == [24576, 24576]
    neox = plan({"model_type": "gpt_neox", "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 256},
                2, 1031)
    assert neox.ranges["qkv"] == [[(0, 96)], [(96, 192)]] and neox.sizes("vocab") == [516, 515]
    with pytest.raises(ShardingError, match=r"num_key_value_heads \(3\) is smaller than the number of shards \(4\)"):
        plan(SMOLLM2, 4, 49152)
    t5 = plan({"model_type": "t5", "num_heads": 4, "d_kv": 16, "d_model": 64, "d_ff": 128}, 2, 1000)
    assert t5.sizes("heads") == [2, 2] and t5.sizes("q") == [32, 32] and t5.sizes("mlp") == [64, 64]
    bias_table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert rule_for({"model_type": "t5"}, bias_table).dim == 1
    with pytest.raises(ShardingError, match="not 'bloom'"):
        plan({"model_type": "bloom"}, 2, 100)
    assert rule_for(SMOLLM2, "model.layers.3.self_attn.o_proj.weight").split == "row"
    assert rule_for(SMOLLM2, "model.layers.3.self_attn.o_proj.bias").split == "replicate"
    assert rule_for(SMOLLM2, "model.norm.weight").split == "replicate"


def test_rules_fused_qkv_blocks_and_multi_query():
    gpt2 = {"model_type": "gpt2", "n_head": 4, "n_embd": 64}
    # [q | k | v] blocks of 64 columns: rank 1 takes heads 2-3 of each block
    assert plan(gpt2, 2, 1000).ranges["qkv_blocks"][1] == [(32, 64), (96, 128), (160, 192)]
    assert rule_for(gpt2, "transformer.h.0.attn.c_proj.weight") == Rule("row", "q")
    assert rule_for(gpt2, "transformer.h.0.mlp.c_proj.weight") == Rule("row", "mlp")
    mqa = plan({"model_type": "gpt_bigcode", "n_head": 4, "n_embd": 64, "multi_query": True}, 2, 1000)
    # every rank keeps the single KV head (columns 64-96 of [q | k | v]) and half of the query heads
    assert mqa.ranges["qkv_blocks"] == [[(0, 32), (64, 80), (80, 96)], [(32, 64), (64, 80), (80, 96)]]
    assert (mqa.q_heads, mqa.kv_heads) == ([2, 2], [1, 1])


def _run_both(pair_engines, make_requests, join_after_steps=None):
    return [run(engine, make_requests(engine), join_after_steps) for engine in pair_engines]


def assert_two_ranks_match_one(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    """Greedy requests joining and leaving a running batch (every other one with a prompt-tuning prefix on
    decoder-only models) give the same tokens and text on 2 ranks as in one process; seeded sampling gives the same
    tokens, with logprobs within 1e-4."""
    loaded = engines[0].core.loaded
    torch.manual_seed(1)
    prefix = None if loaded.is_encoder_decoder else PromptPrefix(
        torch.randn(5, engines[0].facts.embedding_dim) * 0.5, None, loaded.pad_token_id, encoder_decoder=False)

    def greedy(engine):
        reqs = [request(engine, t, max_new_tokens=n) for t, n in zip(PROMPTS, MAX_NEW, strict=True)]
        for r in reqs[1::2]:
            r.prefix = prefix
        return reqs

    one, two = _run_both(engines, greedy, join_after_steps=[0, 0, 1, 2, 3, 5, 6, 8, 9, 12])
    assert [r.token_ids for r in two] == [r.token_ids for r in one]
    assert [r.final.output_text for r in two] == [r.final.output_text for r in one]

    def sampled_with_details(engine):
        return [request(engine, t, max_new_tokens=8, temperature=0.8, top_k=40, seed=7 + i, token_logprobs=True,
                        token_ranks=True, input_tokens=True) for i, t in enumerate(PROMPTS[:4])]

    one, two = _run_both(engines, sampled_with_details)
    for a, b in zip(one, two, strict=True):
        assert b.token_ids == a.token_ids
        got = [d.logprob for o in b.outputs for d in [*(o.input_tokens or []), *o.tokens]]
        want = [d.logprob for o in a.outputs for d in [*(o.input_tokens or []), *o.tokens]]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4, equal_nan=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, engine", [("llama", "native"), ("qwen3", "native"), ("llama", "transformers"),
                                          ("gpt_neox", "auto"), ("t5", "auto"), ("gpt2", "auto"),
                                          ("gpt_bigcode", "auto")])
def test_two_ranks_match_one_under_continuous_batching(pair, name, engine):
    engines = pair(name, engine=engine, max_batch_size=6, max_waiting_tokens=2, max_num_batched_tokens=24)
    assert engines[1].core.runner.local.model.get_input_embeddings().weight.shape[0] < \
        engines[0].core.loaded.model.get_input_embeddings().weight.shape[0]  # really sharded
    assert_two_ranks_match_one(engines)


@pytest.mark.timeout(300)
def test_two_ranks_preempt_and_recompute_like_one(pair):
    engines = pair("llama", max_batch_size=8, kv_cache_tokens=512, max_sequence_length=256)
    preempted = []
    engines[1].add_step_listener(lambda s: preempted.append(s.preempted))

    def long(engine):
        return [request(engine, PROMPTS[i % len(PROMPTS)] * 3, max_new_tokens=60, min_new_tokens=60)
                for i in range(8)]

    one, two = _run_both(engines, long)
    assert sum(preempted) > 0, "the test must exhaust the cache"
    assert [r.token_ids for r in two] == [r.token_ids for r in one]
    assert all(r.final.stop_reason == StopReason.MAX_TOKENS for r in two)
    assert engines[1].failure is None


@pytest.mark.timeout(300)
def test_two_ranks_guided_like_one_through_preemption(pair):
    """Rank 0 samples, grammar masks included; a preempted guided request resumes with its grammar state."""
    engines = pair("llama", max_batch_size=8, kv_cache_tokens=512, max_sequence_length=256)
    preempted = []
    engines[1].add_step_listener(lambda s: preempted.append(s.preempted))
    spec = guided_spec("regex", "[a-z ]+")

    def long(engine):
        return [request(engine, PROMPTS[i % len(PROMPTS)] * 3, max_new_tokens=60, min_new_tokens=60, seed=i,
                        temperature=0.8 if i % 4 == 1 else 0.0, guided=spec if i % 2 else None) for i in range(8)]

    one, two = _run_both(engines, long)
    assert sum(preempted) > 0, "the test must exhaust the cache"
    assert [r.token_ids for r in two] == [r.token_ids for r in one]
    assert all(re.fullmatch("[a-z ]+", r.final.output_text) for r in two[1::2])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["llama", "gpt_neox", "t5"])
def test_presplit_checkpoint_serves_like_the_original(tiny_model, tmp_path, name):
    """`tgis shard` output: each rank reads only its own file, and the tokens equal one process on the original."""
    source = tiny_model(name)
    shard_checkpoint(source, 2, tmp_path / "tp2")
    with pytest.raises(ValueError, match="was split for 2 ranks by `tgis shard`: serve it with --num-gpus 2"):
        AsyncEngine(EngineConfig(model_path=str(tmp_path / "tp2")))
    results = []
    for path, tp in ((source, 1), (tmp_path / "tp2", 2)):
        engine = AsyncEngine(EngineConfig(model_path=str(path), tensor_parallel_size=tp, max_batch_size=4))
        try:
            reqs = [request(engine, t, max_new_tokens=n) for t, n in zip(PROMPTS, MAX_NEW, strict=True)]
            results.append([r.token_ids for r in run(engine, reqs, join_after_steps=[0, 0, 1, 2, 3, 5, 6, 8, 9, 12])])
        finally:
            engine.shutdown()
    assert results[1] == results[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_serve_two_ranks_smollm2_then_a_dead_rank_stops_the_server(smollm2_dir, tmp_path):
    """SmolLM2 has 9 query / 3 KV heads: ranks hold 6+3 / 2+1 heads. Greedy text equals transformers; killing
    rank 1 fails the running stream, and the server exits 1 with the reason in the termination log."""
    prompts = ["The capital of France is", "Once upon a time,", "def fibonacci(n):"]
    expected = transformers_greedy_texts(smollm2_dir, prompts, 20)
    with running_server(smollm2_dir, tmp_path, "--num-gpus", "2", "--dtype", "float32") as server:
        with server.channel() as channel:
            stub = server.stub(channel)
            resp = stub.Generate(pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text=t) for t in prompts],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=20))), timeout=T)
            assert [r.text for r in resp.responses] == expected
            assert resp.responses[0].text.startswith(" Paris.")
            worker = _shard_pid(server.proc.pid)
            stream = stub.GenerateStream(pb.SingleGenerationRequest(
                request=pb.GenerationRequest(text="Tell me a long story."),
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=500, min_new_tokens=500))),
                timeout=T)
            next(stream), next(stream)
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as failed:
                list(stream)
            assert failed.value.code() == grpc.StatusCode.UNKNOWN
            assert failed.value.details().startswith("Request failed during generation")
            assert server.wait(timeout=60) == 1
        assert "Shard 1 exited with code -9" in server.termination_log.read_text()
        assert "fatal: Shard 1 exited" in server.logs()


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _shard_pid(server: int) -> int:
    """The pid of rank 1: a spawned descendant of the server (its engine process, the engine's rank processes)
    that started no process itself and is not multiprocessing's resource tracker."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        engines = [c for c in _children(server) if b"multiprocessing.spawn" in Path(f"/proc/{c}/cmdline").read_bytes()]
        ranks = [r for e in engines for r in _children(e)
                 if b"multiprocessing.spawn" in Path(f"/proc/{r}/cmdline").read_bytes()]
        if ranks:
            return ranks[0]
        time.sleep(0.1)
    raise AssertionError("no shard process found")


def test_start_errors(pair, tiny_model):
    with pytest.raises(ShardingError, match=r"num_attention_heads \(4\) is smaller than the number of shards \(8\)"):
        AsyncEngine(EngineConfig(model_path=str(tiny_model("gpt2")), tensor_parallel_size=8))
    pair("llama")
    with pytest.raises(RuntimeError, match="a tensor-parallel engine is already running in this process"):
        AsyncEngine(EngineConfig(model_path=str(tiny_model("llama")), tensor_parallel_size=2))

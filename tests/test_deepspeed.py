"""DeepSpeed AutoTP tensor parallelism with 2 CPU processes (gloo), for architectures our own split rules lack: the
same results as one process, refusal at start (with the reason) of what AutoTP cannot split, and no DeepSpeed
shared memory left behind. Every test that starts ranks has a hard timeout."""

from __future__ import annotations

import multiprocessing
import re
from pathlib import Path

import pytest
import torch
from engine_utils import transformers_greedy_texts
from server_harness import run_to_exit, running_server
from test_tensor_parallel import assert_two_ranks_match_one

from proto import generation_pb2 as pb
from runtime.config import ConfigError, ServerConfig
from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.engine.hf_runner import TransformersRunner
from runtime.engine.runner import choose_engine
from runtime.parallel.deepspeed import split_method
from runtime.parallel.rules import ShardingError
from runtime.parallel.sharding import shard_checkpoint

SHM = Path("/dev/shm")


@pytest.fixture(scope="module", autouse=True)
def no_deepspeed_shared_memory_left():
    """DeepSpeed's CPU all-reduce op never unlinks its /dev/shm buffers; the server must not use it."""
    before = set(SHM.glob("deepspeed*"))
    yield
    assert set(SHM.glob("deepspeed*")) <= before, "DeepSpeed left shared memory in /dev/shm"


def _split_by_deepspeed(model: torch.nn.Module) -> bool:
    from deepspeed.module_inject.layers import LinearAllreduce

    return any(isinstance(m, LinearAllreduce) for m in model.modules())


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "method"), [("opt", "auto"), ("gptj", "auto"), ("falcon", "auto"), ("phi", "auto"),
                                              ("starcoder2", "auto"), ("llama", "deepspeed")])
def test_two_ranks_match_one(pair, name, method):
    """auto: DeepSpeed where our own rules have none; "deepspeed" (ds_inference) forces it, and the transformers
    engine with it, on a Llama that would otherwise run natively with our own rules."""
    engines = pair(name, tensor_parallel_method=method, max_batch_size=6, max_waiting_tokens=2)
    assert isinstance(engines[0].core.runner, TransformersRunner)
    assert _split_by_deepspeed(engines[1].core.runner.local.model)
    assert_two_ranks_match_one(engines)
    assert not hasattr(torch.ops.deepspeed, "inference_all_reduce_")  # the shm op was never built or loaded


@pytest.mark.parametrize(("name", "message"), [
    ("bloom", "tensor parallelism cannot split 'bloom' models: DeepSpeed AutoTP breaks its ALiBi attention "
              "(shape mismatch, DeepSpeed issue #7239); serve it unsplit (--num-gpus 1)"),
    ("falcon_7b_layout", "tensor parallelism cannot split 'falcon' models: DeepSpeed AutoTP fails on Falcon's "
                         "original attention layout (new_decoder_architecture false, as Falcon-7B); serve it unsplit "
                         "(--num-gpus 1)"),
])
def test_unsplittable_models_are_refused_before_any_rank_starts(tiny_model, name, message):
    with pytest.raises(ShardingError) as refused:
        AsyncEngine(EngineConfig(model_path=str(tiny_model(name)), tensor_parallel_size=2))
    assert str(refused.value) == message
    assert not multiprocessing.active_children()


def test_split_method_choice_and_messages(tiny_model, tmp_path, monkeypatch):
    llama = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
             "intermediate_size": 128, "vocab_size": 1024}
    opt = {"model_type": "opt", "num_attention_heads": 4, "hidden_size": 64}
    assert split_method(llama, "auto", 2) == "rules"
    assert split_method(llama, "deepspeed", 2) == "deepspeed"
    assert split_method(opt, "auto", 2) == "deepspeed"
    with pytest.raises(ShardingError, match="models, not 'opt'"):
        split_method(opt, "rules", 2)
    with pytest.raises(ShardingError, match=r"^tensor parallelism supports gpt2, .*t5 \(own split rules\), opt, gptj, "
                                            r"falcon, phi, starcoder2 \(DeepSpeed AutoTP\) models, not 'mamba': serve "
                                            r"it unsplit \(--num-gpus 1\)$"):
        split_method({"model_type": "mamba"}, "auto", 2)
    with pytest.raises(ShardingError, match=r"supports opt, gptj, falcon, phi, starcoder2, llama \(DeepSpeed AutoTP\) "
                                            r"models, not 'mistral': our own split rules serve it"):
        split_method({**llama, "model_type": "mistral"}, "deepspeed", 2)
    with pytest.raises(ShardingError, match="cannot split 'gpt2' models: DeepSpeed AutoTP cannot split its fused "
                                            "c_attn projection; our own split rules serve it"):
        split_method({"model_type": "gpt2"}, "deepspeed", 2)
    with pytest.raises(ShardingError, match="cannot split 'mixtral' models: DeepSpeed AutoTP would leave its experts"):
        split_method({"model_type": "mixtral"}, "auto", 2)
    with pytest.raises(ShardingError, match=r"cannot split 'phi3' models"):
        split_method({"model_type": "phi3"}, "auto", 2)
    falcon_mqa = {"model_type": "falcon", "new_decoder_architecture": True, "num_attention_heads": 4,
                  "num_kv_heads": 1, "hidden_size": 64}
    with pytest.raises(ShardingError, match=r"^num_kv_heads \(1\) is smaller than the number of shards \(2\)$"):
        split_method(falcon_mqa, "auto", 2)
    with pytest.raises(ShardingError, match=r"^num_attention_heads \(4\) is smaller than the number of shards \(8\)$"):
        split_method(opt, "auto", 8)
    presplit = tmp_path / "tp2"
    shard_checkpoint(tiny_model("llama"), 2, presplit)
    with pytest.raises(ShardingError, match="was split by `tgis shard` .* DeepSpeed tensor parallelism splits the "
                                            "original checkpoint"):
        AsyncEngine(EngineConfig(model_path=str(presplit), tensor_parallel_size=2, tensor_parallel_method="deepspeed"))
    with pytest.raises(ValueError, match="DeepSpeed tensor parallelism runs on the transformers engine"):
        choose_engine(EngineConfig(model_path=str(tiny_model("llama")), engine="native",
                                   tensor_parallel_method="deepspeed"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ShardingError, match=r"splitting 'opt' models needs DeepSpeed: pip install 'tgis\[deepspeed\]'"):
        split_method(opt, "auto", 2)


def test_ds_inference_selects_deepspeed_and_the_transformers_engine():
    ds = ServerConfig(deployment_framework="ds_inference")
    assert (ds.effective_engine, ds.effective_tensor_parallel_method) == ("transformers", "deepspeed")
    explicit = ServerConfig(deployment_framework="ds_inference", tensor_parallel_method="rules")
    assert explicit.effective_tensor_parallel_method == "rules"
    assert ServerConfig().effective_tensor_parallel_method == "auto"
    with pytest.raises(ConfigError, match="tensor_parallel_method must be one of auto, rules, deepspeed, not fast"):
        ServerConfig(tensor_parallel_method="fast").validate()


@pytest.mark.timeout(300)
def test_serve_two_ranks_falcon_greedy_like_transformers(tiny_model, tmp_path):
    """`tgis serve --num-gpus 2` on a Falcon (no rules of our own: DeepSpeed) answers gRPC as transformers does."""
    path = tiny_model("falcon")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
    expected = transformers_greedy_texts(path, prompts, 12, min_new_tokens=12)
    with running_server(path, tmp_path, "--num-gpus", "2", "--dtype", "float32") as server:
        with server.channel() as channel:
            resp = server.stub(channel).Generate(pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text=t) for t in prompts],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=12, min_new_tokens=12))), timeout=120)
        assert [r.text for r in resp.responses] == expected
        assert [r.generated_token_count for r in resp.responses] == [12] * 3
        assert re.search(r"DeepSpeed \S+ AutoTP", server.logs())


@pytest.mark.timeout(120)
def test_serve_refuses_bloom_with_one_line(tiny_model, tmp_path):
    code, output = run_to_exit(tiny_model("bloom"), tmp_path, "--num-gpus", "2",
                               env={"DEPLOYMENT_FRAMEWORK": "ds_inference"})
    assert code == 1
    assert "fatal: tensor parallelism cannot split 'bloom' models: DeepSpeed AutoTP breaks its ALiBi" in output
    assert "Traceback" not in output

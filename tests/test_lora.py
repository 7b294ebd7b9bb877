"""Per-request LoRA adapters (`adapter_id`, PEFT format): the same tokens as transformers running a copy of the model
with the adapter merged into its weights, whatever the adapter's batch neighbours use."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from engine_utils import request, run
from lora_utils import merged_copy, write_lora
from server_harness import running_server
from test_engine import MAX_NEW, PROMPTS

from proto import generation_pb2 as pb
from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.engine.guided_spec import guided_spec
from runtime.engine.lora import LoraRef

T = 120


def _greedy(model, ids: list[int], n: int, pad: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    engine = AsyncEngine(EngineConfig(model_path=str(tiny_model("llama"))))
    model = engine.core.loaded.model
    root = tmp_path_factory.mktemp("adapters")
    adapters = {"attn": write_lora(root / "loras" / "attn", model, ["q_proj", "v_proj"], 1),
                "mlp": write_lora(root / "loras" / "mlp", model, ["gate_proj", "down_proj", "o_proj"], 2)}
    yield root, engine, adapters
    engine.shutdown()


def test_lora_rows_match_merged_models_in_one_batch(store):
    root, engine, adapters = store
    model, pad = engine.core.loaded.model, engine.core.loaded.pad_token_id
    merged = {name: merged_copy(model, w) for name, w in adapters.items()}
    choice = [None, "attn", "mlp", "attn", None, "mlp", "attn", "mlp"]
    reqs = []
    for text, n, name in zip(PROMPTS, MAX_NEW, choice, strict=False):
        req = request(engine, text, max_new_tokens=n)
        req.lora = None if name is None else LoraRef(f"loras/{name}", str(root / "loras" / name))
        reqs.append(req)
    results = run(engine, reqs, join_after_steps=[0, 0, 1, 2, 3, 4, 6, 8])
    changed = 0
    for req, res, name in zip(reqs, results, choice, strict=True):
        n = req.params.max_new_tokens
        base = _greedy(model, req.input_ids, n, pad)
        want = base if name is None else _greedy(merged[name], req.input_ids, n, pad)
        assert res.token_ids == want, (req.request_id, name)
        changed += want != base
    assert changed >= 3, "the adapters must actually change the output"


@pytest.mark.timeout(300)
def test_server_adapter_id(store, tiny_model, tmp_path):
    root, engine, adapters = store
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    merged = merged_copy(engine.core.loaded.model, adapters["attn"])
    want = engine.tokenizer.decode(_greedy(merged, ids, 10, engine.core.loaded.pad_token_id),
                                   skip_special_tokens=True)
    (root / "odd").mkdir()
    (root / "odd" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with running_server(tiny_model("llama"), tmp_path, env={"ADAPTER_CACHE": str(root)}) as server:
        with server.channel() as channel:
            stub = server.stub(channel)

            def generate(adapter_id: str):
                return stub.Generate(pb.BatchedGenerationRequest(
                    adapter_id=adapter_id, requests=[pb.GenerationRequest(text=PROMPTS[0])],
                    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=10))), timeout=T).responses[0]

            assert generate("loras/attn").text == want
            with pytest.raises(grpc.RpcError) as err:
                generate("odd")
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                "adapter type IA3 is not currently supported")


def test_guided_rows_with_adapters(store):
    """Last in the file: merged_copy() above deep-copies the engine's model, hooks and their last batch included."""
    root, engine, _ = store
    choices = ["alpha", "beta", "gamma"]
    spec = guided_spec("choice", choices)
    reqs = []
    for text, name in zip(PROMPTS, [None, "attn", "mlp", "attn"], strict=False):
        req = request(engine, text, max_new_tokens=12, guided=spec)
        req.lora = None if name is None else LoraRef(f"loras/{name}", str(root / "loras" / name))
        reqs.append(req)
    for res in run(engine, reqs):
        assert res.final.output_text in choices

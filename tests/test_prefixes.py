"""Prompt-tuning prefixes (`prefix_id`, spec §5.4): the store's checks and messages, generation with virtual tokens
against transformers fed the same embeddings, and the server's validation path."""

from __future__ import annotations

import grpc
import pytest
import torch
from engine_utils import reference_model, request, run
from safetensors.torch import save_file
from server_harness import running_server
from test_engine import MAX_NEW, PROMPTS

from proto import generation_pb2 as pb
from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.models.prefixes import PrefixError, PrefixNotFound, PrefixStore, PromptPrefix

T = 120
DIM = 64  # hidden size of the tiny fixtures


def _store(root, encoder_decoder=False, **kw) -> PrefixStore:
    args = dict(embedding_dim=DIM, dtype=torch.float32, encoder_decoder=encoder_decoder, max_length=8,
                cache_bytes=1 << 20, placeholder_id=0) | kw
    return PrefixStore(root, **args)


def _write(root, prefix_id: str, **tensors: torch.Tensor) -> None:
    folder = root / prefix_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensor in tensors.items():
        torch.save(tensor, folder / f"{name}.pt")


def test_store_checks_and_messages(tmp_path):
    _write(tmp_path, "ok", decoder=torch.randn(4, DIM))
    _write(tmp_path, "nested/ok2", decoder=torch.randn(2, DIM))
    _write(tmp_path, "3d", decoder=torch.randn(1, 4, DIM))
    _write(tmp_path, "long", decoder=torch.randn(9, DIM))
    _write(tmp_path, "narrow", decoder=torch.randn(4, 32))
    _write(tmp_path, "nan", decoder=torch.full((2, DIM), float("nan")))
    _write(tmp_path, "big", decoder=torch.full((2, DIM), 1e6))
    _write(tmp_path, "encoder_only", encoder=torch.randn(2, DIM))
    store = _store(tmp_path)
    prefix, loaded = store.get("ok")
    assert loaded and prefix.length == 4 and prefix.decoder.dtype == torch.float32
    assert store.get("ok") == (prefix, False)  # cached
    assert store.get("nested/ok2")[0].length == 2
    cases = {
        "bad id!": "Invalid prefix id bad id!, must contain only alphanumeric, _ and - and /",
        "../escape": "Invalid prefix id ../escape, must contain only alphanumeric, _ and - and /",
        "3d": "Invalid prefix embedding tensor",
        "long": "Invalid prefix embedding length of 9",
        "narrow": f"Prefix embedding tensor dim 32 does not match model ({DIM})",
        "nan": "Prefix contains non-finite elements",
    }
    for prefix_id, message in cases.items():
        with pytest.raises(PrefixError) as err:
            store.get(prefix_id)
        assert str(err.value) == message
    with pytest.raises(PrefixError, match="after conversion from torch.float32 to torch.float16"):
        _store(tmp_path, dtype=torch.float16).get("big")
    for missing in ("absent", "encoder_only"):  # decoder-only models need decoder.pt
        with pytest.raises(PrefixNotFound):
            store.get(missing)
    seq2seq = _store(tmp_path, encoder_decoder=True)
    assert seq2seq.get("encoder_only")[0].length == 2
    with pytest.raises(PrefixError, match="Encoder/decoder prefix tensor must be of even length"):
        _write(tmp_path, "odd", encoder=torch.randn(3, DIM))
        seq2seq.get("odd")
    both = PromptPrefix(torch.zeros(2, DIM), torch.zeros(4, DIM), 0, encoder_decoder=True)
    assert both.length == 2 + 1 + 4  # the decoder part counts the start token, as in TGIS


def test_store_peft_format_and_lru_cache(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    embeddings = torch.randn(3, DIM)
    save_file({"prompt_embeddings": embeddings}, folder / "adapter_model.safetensors")
    assert torch.equal(_store(tmp_path).get("peft")[0].decoder, embeddings)
    with pytest.raises(PrefixError, match="encoder-decoder architectures not supported for peft models"):
        _store(tmp_path, encoder_decoder=True).get("peft")
    for name in ("a", "b", "c"):
        _write(tmp_path, name, decoder=torch.randn(4, DIM))  # 1 KiB each in float32
    small = _store(tmp_path, cache_bytes=2048)
    small.get("a"), small.get("b")
    small.get("a")  # a is now the most recently used
    small.get("c")  # evicts b
    assert small.get("a")[1] is False and small.get("b")[1] is True
    with pytest.raises(PrefixError, match="Prefix ID object a exceeds the allowed cache size"):
        _store(tmp_path, cache_bytes=512).get("a")


def _hf_greedy_with_prefix(engine: AsyncEngine, prefix: torch.Tensor, input_ids: list[int], n: int) -> list[int]:
    model = reference_model(engine)
    ids = torch.tensor([input_ids])
    embeds = torch.cat([prefix[None], model.get_input_embeddings()(ids)], dim=1)
    with torch.inference_mode():
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=engine.core.loaded.pad_token_id)
    return out[0].tolist()


@pytest.fixture(scope="module")
def llama(tiny_model):
    engine = AsyncEngine(EngineConfig(model_path=str(tiny_model("llama")), max_batch_size=6, max_waiting_tokens=2))
    yield engine
    engine.shutdown()


def test_decoder_prefix_matches_transformers_inside_a_busy_batch(llama, tmp_path):
    torch.manual_seed(1)
    _write(tmp_path, "tuned", decoder=torch.randn(5, DIM) * 0.5)
    prefix, _ = _store(tmp_path).get("tuned")
    prefix = PromptPrefix(prefix.decoder, None, llama.core.loaded.pad_token_id, encoder_decoder=False)
    reqs = [request(llama, t, max_new_tokens=n) for t, n in zip(PROMPTS[:6], MAX_NEW[:6], strict=True)]
    for r in reqs[::2]:
        r.prefix = prefix
    reqs[0].params.input_tokens = reqs[0].params.token_logprobs = True
    results = run(llama, reqs, join_after_steps=[0, 0, 1, 2, 3, 4])
    for req, res in zip(reqs, results, strict=True):
        if req.prefix is None:
            continue
        assert res.token_ids == _hf_greedy_with_prefix(llama, prefix.decoder, req.input_ids,
                                                       req.params.max_new_tokens), req.request_id
    details = results[0].outputs[0].input_tokens
    assert [d.token_id for d in details] == [llama.core.loaded.pad_token_id] * 5 + reqs[0].input_ids
    assert details[0].logprob != details[0].logprob  # NaN: the first (virtual) position


def test_encoder_and_decoder_prefixes_on_t5(tiny_model, tmp_path):
    engine = AsyncEngine(EngineConfig(model_path=str(tiny_model("t5"))))
    try:
        lm = engine.core.loaded
        torch.manual_seed(2)
        enc, dec = torch.randn(4, DIM) * 0.5, torch.randn(2, DIM) * 0.5
        req = request(engine, PROMPTS[3], max_new_tokens=8)
        req.prefix = PromptPrefix(dec, enc, lm.pad_token_id, encoder_decoder=True)
        [res] = run(engine, [req])
        model, embed = lm.model, lm.model.get_input_embeddings()
        with torch.inference_mode():  # greedy by hand: full forward each step, no cache
            enc_embeds = torch.cat([enc, embed(torch.tensor(req.input_ids))])[None]
            generated: list[int] = []
            for _ in range(8):
                dec_ids = torch.tensor([lm.decoder_start_token_id, *generated])
                dec_embeds = torch.cat([dec, embed(dec_ids)])[None]
                logits = model(inputs_embeds=enc_embeds, decoder_inputs_embeds=dec_embeds).logits
                generated.append(int(logits[0, -1].argmax()))
                if generated[-1] == lm.eos_token_id:
                    break
        assert res.token_ids == generated
    finally:
        engine.shutdown()


@pytest.mark.timeout(300)
def test_server_prefix_id(tiny_model, tmp_path):
    torch.manual_seed(3)
    prefix = torch.randn(6, DIM) * 0.5
    _write(tmp_path / "store", "team/tuned", decoder=prefix)
    _write(tmp_path / "store", "bad", decoder=torch.randn(4, 8))
    engine_ref = AsyncEngine(EngineConfig(model_path=str(tiny_model("llama"))))
    try:
        ids = engine_ref.tokenizer(PROMPTS[0])["input_ids"]
        expected = _hf_greedy_with_prefix(engine_ref, prefix, ids, 10)
        expected_text = engine_ref.tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        engine_ref.shutdown()
    with running_server(tiny_model("llama"), tmp_path / "srv", "--max-sequence-length", "40",
                        env={"PREFIX_STORE_PATH": str(tmp_path / "store")}) as server:
        with server.channel() as channel:
            stub = server.stub(channel)

            def generate(prefix_id: str):
                return stub.Generate(pb.BatchedGenerationRequest(
                    prefix_id=prefix_id, requests=[pb.GenerationRequest(text=PROMPTS[0])],
                    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=10),
                                         response=pb.ResponseOptions(input_tokens=True))), timeout=T)

            resp = generate("team/tuned").responses[0]
            assert resp.text == expected_text and resp.generated_token_count == len(expected)
            assert resp.input_token_count == len(ids)  # virtual tokens are not input tokens...
            assert len(resp.input_tokens) == 6 + len(ids)  # ...but input details list their positions
            failures = {
                "missing": "can't retrieve prompt prefix with id 'missing': prefix id \"missing\" not found",
                "bad": "can't retrieve prompt prefix with id 'bad': Unexpected <class 'Exception'>: Prefix "
                       f"embedding tensor dim 8 does not match model ({DIM})",
            }
            for prefix_id, message in failures.items():
                with pytest.raises(grpc.RpcError) as err:
                    generate(prefix_id)
                assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
            long_text = " ".join(["word"] * 60)  # far more than 34 tokens: truncation makes the input 34 long
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.BatchedGenerationRequest(prefix_id="team/tuned", requests=[
                    pb.GenerationRequest(text=long_text)], params=pb.Parameters(truncate_input_tokens=34)), timeout=T)
            assert err.value.details() == "input tokens (34) plus prefix length (6) must be < 40"
            clamped = stub.Generate(pb.BatchedGenerationRequest(prefix_id="team/tuned", requests=[
                pb.GenerationRequest(text=long_text)], params=pb.Parameters(
                    truncate_input_tokens=30, stopping=pb.StoppingCriteria(max_new_tokens=10, min_new_tokens=4))),
                timeout=T).responses[0]
            assert (clamped.input_token_count, clamped.generated_token_count) == (30, 4)  # 30 + 6 + 4 = 40
            assert clamped.stop_reason == pb.TOKEN_LIMIT
        metrics = server.metrics()
        assert metrics["tgi_prompt_load_failure_total"] == 2
        assert metrics["tgi_prompt_load_duration_count"] == 1  # loaded once, then cached

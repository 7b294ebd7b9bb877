"""The real `tgis serve` on a tiny Llama (S=512, server max_new_tokens 400): every RPC, every validation message for
Generate and GenerateStream, greedy parity with transformers, stream/unary parity, concurrency, cancellation,
metrics, health and reflection."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_harness import running_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from proto import generation_pb2 as pb
from proto import generation_pb2_grpc as pb_grpc

S, MAX_NEW, CONCURRENCY = 512, 400, 64
T = 60  # per-RPC timeout (s)
PROMPTS = ["Hello world, this is", "def f(x):\n    return", "The quick brown fox", "Unicode: café naïve 中文"]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module", params=["false", "true"], ids=["sync", "async-scheduling"])
def server(model_dir, tmp_path_factory, request):
    """Every test against the synchronous engine loop (the CPU default) and against async scheduling (the GPU
    default: each step planned while the one before is in flight)."""
    with running_server(model_dir, tmp_path_factory.mktemp("grpc-server"), "--max-sequence-length", str(S),
                        "--max-new-tokens", str(MAX_NEW), "--max-batch-size", "16",
                        "--max-concurrent-requests", str(CONCURRENCY), "--json-output",
                        "--async-scheduling", request.param) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def gen_request(text: str | list[str], **params) -> pb.BatchedGenerationRequest:
    texts = [text] if isinstance(text, str) else text
    return pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=t) for t in texts],
                                       params=pb.Parameters(**params))


def stream_request(text: str, **params) -> pb.SingleGenerationRequest:
    return pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text), params=pb.Parameters(**params))


def stopping(**kw) -> pb.StoppingCriteria:
    return pb.StoppingCriteria(**kw)


def hf_greedy(hf, text: str, max_new_tokens: int) -> list[int]:
    model, tok = hf
    ids = tok(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def continuation(tok, text: str, new_ids: list[int]) -> str:
    """The text the new ids add after the prompt (EOS never shown, incomplete UTF-8 dropped)."""
    ids = tok(text).input_ids
    full = tok.decode(ids + new_ids, skip_special_tokens=True)
    return full[len(tok.decode(ids, skip_special_tokens=True)):].rstrip("\ufffd")


def test_the_engine_loop_is_the_one_asked_for(server, request):
    wanted = "on" if request.node.callspec.params["server"] == "true" else "off"
    assert f"engine loop: async scheduling {wanted}" in server.log_path.read_text()


def test_model_info_and_tokenize(stub, hf):
    info = stub.ModelInfo(pb.ModelInfoRequest(model_id="ignored"), timeout=T)
    assert (info.model_kind, info.max_sequence_length, info.max_new_tokens) == (
        pb.ModelInfoResponse.DECODER_ONLY, S, MAX_NEW)
    _, tok = hf
    texts = ["café naïve 中文", "Hello world"]
    resp = stub.Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=t) for t in texts],
                                                   return_tokens=True, return_offsets=True), timeout=T)
    for text, r in zip(texts, resp.responses, strict=True):
        enc = tok(text, return_offsets_mapping=True)
        assert r.token_count == len(enc.input_ids)
        assert list(r.tokens) == tok.convert_ids_to_tokens(enc.input_ids) and r.tokens[0] == "<s>"
        assert (r.offsets[0].start, r.offsets[0].end) == (0, 0)  # BOS
        raw = text.encode()  # byte offsets select exactly the characters HF's character offsets select
        assert [raw[o.start:o.end].decode() for o in r.offsets] == [text[s:e] for s, e in enc.offset_mapping]
    assert resp.responses[0].offsets[-1].end == len("café naïve 中文".encode()) == 19
    truncated = stub.Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=texts[0])],
                                                        return_tokens=True, truncate_input_tokens=3), timeout=T)
    assert truncated.responses[0].token_count == 3
    assert list(truncated.responses[0].tokens) == list(resp.responses[0].tokens[-3:])
    assert not truncated.responses[0].offsets


def test_greedy_matches_transformers(stub, hf):
    _, tok = hf
    for text, n in zip(PROMPTS, [12, 5, 30, 9], strict=True):
        ref = hf_greedy(hf, text, n)
        [r] = stub.Generate(gen_request(text, stopping=stopping(max_new_tokens=n),
                                        response=pb.ResponseOptions(generated_tokens=True)), timeout=T).responses
        assert [t.text for t in r.tokens] == tok.convert_ids_to_tokens(ref)
        assert r.text == continuation(tok, text, ref)
        assert r.generated_token_count == len(ref)
        assert r.input_token_count == len(tok(text).input_ids)
        assert r.stop_reason == (pb.EOS_TOKEN if ref[-1] == tok.eos_token_id else pb.MAX_TOKENS)
        assert r.seed == 0


def _stream(stub, req) -> list[pb.GenerationResponse]:
    return list(stub.GenerateStream(req, timeout=T))


def _check_stream_matches_unary(stub, text: str, **params):
    [unary] = stub.Generate(gen_request(text, **params), timeout=T).responses
    msgs = _stream(stub, stream_request(text, **params))
    first, final = msgs[0], msgs[-1]
    assert first.input_token_count == unary.input_token_count and first.generated_token_count == 0
    assert first.seed == final.seed == unary.seed
    assert "".join(m.text for m in msgs) == unary.text
    assert (final.stop_reason, final.stop_sequence, final.generated_token_count) == (
        unary.stop_reason, unary.stop_sequence, unary.generated_token_count)
    assert all(m.stop_reason == pb.NOT_FINISHED for m in msgs[:-1])
    body = msgs[1:]
    if params.get("response") and params["response"].input_tokens:
        assert list(body[0].input_tokens) == list(unary.input_tokens)
        assert body[0].input_token_count == len(unary.input_tokens) and not body[0].text
        body = body[1:]
    assert all(m.text or m.tokens for m in body[:-1])  # empty non-final messages are suppressed
    counts = [m.generated_token_count for m in body]
    assert counts == sorted(counts) and counts[-1] == unary.generated_token_count
    assert [t for m in body for t in m.tokens] == list(unary.tokens)
    return unary


def test_stream_concatenates_to_unary_text(stub):
    base = stub.Generate(gen_request(PROMPTS[0], stopping=stopping(max_new_tokens=40)), timeout=T).responses[0].text
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop.strip(), base
    end = base.index(stop)
    details = pb.ResponseOptions(generated_tokens=True, input_tokens=True, token_logprobs=True, token_ranks=True,
                                 top_n_tokens=2)
    matrix = [
        dict(stopping=stopping(max_new_tokens=40)),
        dict(stopping=stopping(max_new_tokens=40, stop_sequences=[stop])),
        dict(stopping=stopping(max_new_tokens=40, stop_sequences=["zzz", stop], include_stop_sequence=False),
             response=pb.ResponseOptions(generated_tokens=True)),
        dict(stopping=stopping(max_new_tokens=25), response=details),
        dict(stopping=stopping(max_new_tokens=25), response=pb.ResponseOptions(input_text=True)),
        dict(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.8, top_k=50, top_p=0.9, seed=42),
             stopping=stopping(max_new_tokens=30), response=pb.ResponseOptions(generated_tokens=True)),
        dict(method=pb.SAMPLE, sampling=pb.SamplingParameters(seed=7), decoding=pb.DecodingParameters(
            repetition_penalty=1.3), stopping=stopping(max_new_tokens=30, min_new_tokens=3,
                                                       stop_sequences=[" ", "e"])),
    ]
    results = [_check_stream_matches_unary(stub, PROMPTS[0], **params) for params in matrix]
    assert results[0].text == base
    assert (results[1].stop_reason, results[1].stop_sequence, results[1].text) == (
        pb.STOP_SEQUENCE, stop, base[:end + len(stop)])
    assert (results[2].stop_reason, results[2].stop_sequence, results[2].text) == (pb.STOP_SEQUENCE, stop, base[:end])
    assert len(results[2].tokens) == results[2].generated_token_count
    assert results[4].text == PROMPTS[0] + results[3].text
    assert results[5].seed == 42 and results[6].seed == 7
    assert len(results[3].input_tokens) == results[3].input_token_count and results[3].input_tokens[0].text == "<s>"
    assert all(len(t.top_tokens) >= 1 and t.rank >= 1 for t in results[3].tokens)


def test_unseeded_sampling_draws_distinct_u32_seeds(stub):
    resp = stub.Generate(gen_request([PROMPTS[1]] * 5, method=pb.SAMPLE, stopping=stopping(max_new_tokens=2)),
                         timeout=T)
    seeds = [r.seed for r in resp.responses]
    assert len(set(seeds)) == 5 and all(0 <= s <= 2**32 - 1 for s in seeds)


def _validation_cases(tok) -> list[tuple[dict, str, str]]:
    long_text = " the" * 600
    long_len = len(tok(long_text).input_ids)
    near_text = " the" * 300
    near_len = len(tok(near_text).input_ids)
    sample = pb.SAMPLE
    lp = pb.DecodingParameters.LengthPenalty
    return [
        (dict(method=sample, sampling=pb.SamplingParameters(temperature=0.01)), "hi", "temperature must be >= 0.05"),
        (dict(method=sample, sampling=pb.SamplingParameters(top_p=1.5)), "hi", "top_p must be > 0.0 and <= 1.0"),
        (dict(method=sample, sampling=pb.SamplingParameters(typical_p=1.5)), "hi", "typical_p must be <= 1.0"),
        (dict(method=sample, sampling=pb.SamplingParameters(top_k=2**31)), "hi", "top_k must be strictly positive"),
        (dict(stopping=stopping(max_new_tokens=MAX_NEW + 1)), "hi", f"max_new_tokens must be <= {MAX_NEW}"),
        (dict(stopping=stopping(min_new_tokens=30)), "hi", "min_new_tokens must be <= max_new_tokens"),
        (dict(decoding=pb.DecodingParameters(repetition_penalty=-0.5)), "hi", "repetition_penalty must be > 0.0"),
        (dict(decoding=pb.DecodingParameters(length_penalty=lp(decay_factor=0.5))), "hi",
         "length_penalty must be >= 1.0 and <= 10.0"),
        (dict(stopping=stopping(stop_sequences=list("abcdefg"))), "hi",
         "can specify at most 6 non-empty stop sequences, each not more than 240 UTF8 bytes"),
        (dict(response=pb.ResponseOptions(token_ranks=True)), "hi",
         "must request input and/or generated tokens to request extra token detail"),
        (dict(stopping=stopping(stop_sequences=["x" * 241])), "hi",
         "can specify at most 6 non-empty stop sequences, each not more than 240 UTF8 bytes"),
        ({}, long_text, f"input tokens ({long_len}) plus prefix length (0) must be < {S}"),
        (dict(stopping=stopping(max_new_tokens=MAX_NEW, min_new_tokens=S - near_len + 1)), near_text,
         f"input tokens ({near_len}) plus prefix length (0) plus min_new_tokens ({S - near_len + 1}) must be <= {S}"),
    ]


def test_validation_messages_unary_and_stream(stub, hf):
    for params, text, message in _validation_cases(hf[1]):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(gen_request(["fine", text], **params), timeout=T)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        with pytest.raises(grpc.RpcError) as err:
            _stream(stub, stream_request(text, **params))
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    with pytest.raises(grpc.RpcError) as err:
        _stream(stub, pb.SingleGenerationRequest(params=pb.Parameters()))
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "missing request")
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.BatchedGenerationRequest(prefix_id="nope", requests=[pb.GenerationRequest(text="x")]),
                      timeout=T)
    assert err.value.details() == "can't retrieve prompt prefix with id 'nope': prefix id \"nope\" not found"
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(gen_request(["x"] * (CONCURRENCY + 1)), timeout=T)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "Model is overloaded")
    assert stub.Generate(pb.BatchedGenerationRequest(), timeout=T) == pb.BatchedGenerationResponse()


def test_length_clamp_reports_token_limit_and_truncation(stub, hf):
    _, tok = hf
    text = " the" * 300
    n = len(tok(text).input_ids)
    [r] = stub.Generate(gen_request(text, stopping=stopping(max_new_tokens=MAX_NEW, min_new_tokens=S - n)),
                        timeout=T).responses
    assert (r.generated_token_count, r.stop_reason, r.input_token_count) == (S - n, pb.TOKEN_LIMIT, n)
    [r] = stub.Generate(gen_request(text, truncate_input_tokens=5, stopping=stopping(max_new_tokens=3),
                                    response=pb.ResponseOptions(input_text=True, input_tokens=True)),
                        timeout=T).responses
    assert r.input_token_count == 5 and r.text.startswith(text)  # the full input is echoed
    assert [t.text for t in r.input_tokens] == ["<s>"] + tok.convert_ids_to_tokens(tok(text).input_ids[-4:])


def _mixed_requests() -> list[tuple[str, object]]:
    reqs = []
    for i in range(CONCURRENCY):
        text = PROMPTS[i % len(PROMPTS)] + " " * (i % 3)
        params = dict(stopping=stopping(max_new_tokens=5 + i % 17), response=pb.ResponseOptions(generated_tokens=True))
        if i % 4 == 1:
            params |= dict(method=pb.SAMPLE, sampling=pb.SamplingParameters(seed=1000 + i, temperature=0.9))
        kind = "stream" if i % 2 else "unary"
        reqs.append((kind, stream_request(text, **params) if kind == "stream" else gen_request(text, **params)))
    return reqs


async def _one(stub, kind: str, req) -> tuple:
    if kind == "unary":
        [r] = (await stub.Generate(req, timeout=T)).responses
        return r.text, r.stop_reason, r.generated_token_count, [t.text for t in r.tokens]
    msgs = [m async for m in stub.GenerateStream(req, timeout=T)]
    return ("".join(m.text for m in msgs), msgs[-1].stop_reason, msgs[-1].generated_token_count,
            [t.text for m in msgs for t in m.tokens])


def test_64_concurrent_mixed_requests_match_sequential(server):
    reqs = _mixed_requests()

    async def main(concurrent: bool):
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            if concurrent:
                return await asyncio.gather(*(_one(stub, kind, req) for kind, req in reqs))
            return [await _one(stub, kind, req) for kind, req in reqs]

    sequential = asyncio.run(asyncio.wait_for(main(False), 240))
    concurrent = asyncio.run(asyncio.wait_for(main(True), 240))
    assert concurrent == sequential
    assert all(r[2] > 0 for r in sequential)


def test_cancelled_streams_free_the_engine(server, stub):
    follow = gen_request(PROMPTS[2], stopping=stopping(max_new_tokens=8))
    expected = stub.Generate(follow, timeout=T)
    before = server.metrics().get('tgi_request_failure{err="cancelled"}', 0)
    success_key = 'tgi_request_success{kind="stream",stop_reason="MAX_TOKENS"}'
    successes = server.metrics().get(success_key, 0)
    long = stream_request(PROMPTS[0], stopping=stopping(max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW))
    calls = [stub.GenerateStream(long, timeout=T) for _ in range(16)]
    for call in calls:
        next(call), next(call)  # first message, then a generated token: the request is in the engine
    for call in calls:
        call.cancel()
    assert stub.Generate(follow, timeout=T) == expected
    deadline = time.monotonic() + 10
    while server.metrics().get('tgi_request_failure{err="cancelled"}', 0) - before < 16:
        assert time.monotonic() < deadline, "cancellations not counted"
        time.sleep(0.1)
    assert server.metrics()['tgi_request_failure{err="cancelled"}'] - before == 16
    # the engine dropped them: 16 x 400 tokens would keep the batch busy long after the follow-up (a wall-clock
    # bound would say the same, but not on a loaded machine)
    assert server.metrics()["tgi_batch_current_size"] == 0
    assert server.metrics().get(success_key, 0) == successes  # none of them ran to completion


def test_metrics_move_with_traffic(server, stub):
    def delta(after, before, key):
        return after.get(key, 0) - before.get(key, 0)

    before = server.metrics()
    single = stub.Generate(gen_request("one", stopping=stopping(max_new_tokens=3)), timeout=T).responses
    batch = stub.Generate(gen_request(["two", "three", "four"], stopping=stopping(max_new_tokens=4)),
                          timeout=T).responses
    streamed = _stream(stub, stream_request("five", stopping=stopping(max_new_tokens=2)))
    with pytest.raises(grpc.RpcError):
        stub.Generate(gen_request("bad", stopping=stopping(min_new_tokens=50)), timeout=T)
    stub.Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text="a b"), pb.TokenizeRequest(text="c")]),
                  timeout=T)
    after = server.metrics()
    assert delta(after, before, 'tgi_request_count{kind="single"}') == 2  # incl. the failing one
    assert delta(after, before, 'tgi_request_count_total{kind="batch"}') == 1
    assert delta(after, before, 'tgi_request_count{kind="stream"}') == 1
    assert delta(after, before, "tgi_request_input_count") == 6
    assert delta(after, before, 'tgi_request_failure{err="validation"}') == 1
    generated = sum(r.generated_token_count for r in [*single, *batch]) + streamed[-1].generated_token_count
    success = sum(delta(after, before, k) for k in after if k.startswith("tgi_request_success{"))
    assert success == 5
    assert delta(after, before, "tgi_request_generated_tokens_sum") == generated
    assert delta(after, before, "tgi_request_input_length_count") == 5
    assert delta(after, before, 'tgi_batch_inference_count{method="prefill"}') >= 1
    assert delta(after, before, 'tgi_batch_inference_success{method="next_token"}') >= 3
    assert delta(after, before, "tgi_tokenize_request_count") == 1
    assert delta(after, before, "tgi_tokenize_request_input_count") == 2
    assert delta(after, before, "tgi_request_queue_duration_count") == 5
    assert after['tgi_request_duration_bucket{le="+Inf"}'] >= 5


def test_health_and_reflection(server):
    assert server.http("/health") == (200, b"")
    assert server.http("/nope")[0] == 404
    with server.channel() as channel:
        for name in ("", "fmaas.GenerationService"):
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=T)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                   timeout=T)
        names = {s.name for s in answer.list_services_response.service}
        assert {"fmaas.GenerationService", "grpc.health.v1.Health"} <= names


def test_json_completion_log_with_correlation_id(server, stub):
    [r] = stub.Generate(gen_request("log me", stopping=stopping(max_new_tokens=4, min_new_tokens=4)), timeout=T,
                        metadata=[("x-correlation-id", "corr-42")]).responses
    deadline = time.monotonic() + 10
    while "corr-42" not in server.logs():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    lines = [json.loads(x) for x in server.logs().splitlines()]  # every line is one JSON object
    [line] = [x for x in lines if x.get("correlation_id") == "corr-42"]
    assert line["correlation_id"] == "corr-42" and line["level"] == "INFO"
    assert line["message"] == (f"Request generated 4 tokens before MaxTokens, output {len(r.text.encode())} bytes: "
                               f"{json.dumps(r.text[:32], ensure_ascii=False)}")

"""The gRPC servicer in-process against a scripted engine: the paths a real model cannot trigger on demand
(generation failures, deadlines hit while queued, empty deltas, cancellation) and the exact stream message layout."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from server_harness import http_get
from transformers import AutoTokenizer

from proto import generation_pb2 as pb
from proto import generation_pb2_grpc as pb_grpc
from runtime.engine.request import EngineRequest, RequestOutput, StopReason, TokenDetail, TopToken
from runtime.server import http as http_module
from runtime.server.frontend import FrontEnd
from runtime.server.grpc_service import GenerationServicer
from runtime.server.http import HttpServer, health_metrics_app
from runtime.server.metrics import Metrics
from runtime.server.validation import EMPTY_INPUT_MESSAGE
from runtime.server.wire import add_generation_service


class ScriptedEngine:
    """Token ids 10, 11, 12 with texts "a", "" (held back), "bc"; the prompt text picks failure modes."""

    is_encoder_decoder = False
    max_sequence_length = 64
    eos_token_id = 0

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: list[EngineRequest] = []
        self.closed_early: list[str] = []
        self.prompt_of: dict[str, str] = {}

    async def generate(self, request: EngineRequest):
        self.requests.append(request)
        prompt = self.tokenizer.decode(request.input_ids)
        rid = request.request_id
        if "queued-timeout" in prompt:
            yield RequestOutput(rid, finished=True, stop_reason=StopReason.TIME_LIMIT, output_text="")
            return
        finished = False
        try:
            steps = [(10, "a"), (11, ""), (12, "bc")]
            for i, (tid, text) in enumerate(steps, 1):
                if "slow" in prompt:
                    await asyncio.sleep(30)
                if "fail" in prompt and i == 2:
                    finished = True
                    yield RequestOutput(rid, finished=True, stop_reason=StopReason.ERROR, error="GPU out of memory",
                                        generated_token_count=1)
                    return
                detail = TokenDetail(tid, logprob=-0.5, rank=1, top_tokens=[TopToken(tid, -0.5)])
                out = RequestOutput(rid, [tid], text, i, [detail] if request.params.generated_tokens else [])
                if i == 1 and request.params.input_tokens:
                    out.input_tokens = [TokenDetail(t, logprob=float("nan")) for t in request.input_ids]
                if i == len(steps):
                    finished = True
                    out.finished, out.stop_reason, out.output_text = True, StopReason.MAX_TOKENS, "abc"
                    out.inference_time = 0.03
                yield out
        finally:
            if not finished:
                self.closed_early.append(rid)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model("gpt2"))


def run_with_server(tokenizer, body, max_concurrent: int = 8):
    engine = ScriptedEngine(tokenizer)
    metrics = Metrics(64, 40, 4)

    async def main():
        server = grpc.aio.server()
        add_generation_service(GenerationServicer(FrontEnd(engine, metrics, 40, max_concurrent), True), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await asyncio.wait_for(body(pb_grpc.GenerationServiceStub(channel)), 60)
        finally:
            await server.stop(0)

    return asyncio.run(main()), engine, metrics


def req(text: str, **params) -> pb.SingleGenerationRequest:
    return pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text), params=pb.Parameters(**params))


def batch(texts: list[str], **params) -> pb.BatchedGenerationRequest:
    return pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=t) for t in texts],
                                       params=pb.Parameters(**params))


def test_stream_message_layout(tokenizer):
    details = pb.ResponseOptions(input_text=True, input_tokens=True, generated_tokens=True, token_logprobs=True)

    async def body(stub):
        return [m async for m in stub.GenerateStream(req("hello world", response=details, method=pb.SAMPLE,
                                                         sampling=pb.SamplingParameters(seed=5)))]

    msgs, engine, _ = run_with_server(tokenizer, body)
    n_input = len(tokenizer("hello world").input_ids)
    first, inputs, *tokens = msgs
    assert first == pb.GenerationResponse(input_token_count=n_input, seed=5, text="hello world")
    assert inputs.input_token_count == n_input and [t.text for t in inputs.input_tokens] == \
        tokenizer.convert_ids_to_tokens(tokenizer("hello world").input_ids)
    assert not inputs.text and inputs.generated_token_count == 0
    # token 2 has no text but carries its TokenInfo, so it is not suppressed
    assert [(m.generated_token_count, m.text, m.stop_reason) for m in tokens] == [
        (1, "a", pb.NOT_FINISHED), (2, "", pb.NOT_FINISHED), (3, "bc", pb.MAX_TOKENS)]
    assert [m.tokens[0].text for m in tokens] == tokenizer.convert_ids_to_tokens([10, 11, 12])
    assert tokens[0].tokens[0].top_tokens[0].text == tokenizer.convert_ids_to_tokens(10)
    assert tokens[-1].seed == 5 and tokens[0].seed == 0
    assert engine.requests[0].params.stream


def test_empty_non_final_messages_are_suppressed(tokenizer):
    async def body(stub):
        return [m async for m in stub.GenerateStream(req("hi"))]

    msgs, _, _ = run_with_server(tokenizer, body)
    assert [(m.generated_token_count, m.text) for m in msgs] == [(0, ""), (1, "a"), (3, "bc")]
    assert msgs[0].input_token_count == len(tokenizer("hi").input_ids)


def test_unary_assembly_and_metrics(tokenizer):
    async def body(stub):
        return await stub.Generate(batch(["x", "y"], response=pb.ResponseOptions(input_text=True,
                                                                                   generated_tokens=True)))

    resp, engine, metrics = run_with_server(tokenizer, body)
    assert [r.text for r in resp.responses] == ["xabc", "yabc"]
    assert all(r.generated_token_count == 3 and r.stop_reason == pb.MAX_TOKENS and len(r.tokens) == 3
               for r in resp.responses)
    text = metrics.render().decode()
    assert 'tgi_request_success{kind="batch",stop_reason="MAX_TOKENS"} 2.0' in text
    assert "tgi_request_generated_tokens_sum 6.0" in text and "tgi_request_input_count 2.0" in text


def test_generation_failure_fails_the_rpc(tokenizer):
    async def body(stub):
        codes = []
        for call in (stub.Generate(batch(["ok", "please fail"])), stub.GenerateStream(req("please fail"))):
            try:
                if isinstance(call, grpc.aio.UnaryUnaryCall):
                    await call
                else:
                    async for _ in call:
                        pass
            except grpc.aio.AioRpcError as err:
                codes.append((err.code(), err.details()))
        return codes

    codes, _, metrics = run_with_server(tokenizer, body)
    assert codes == [(grpc.StatusCode.UNKNOWN, "Request failed during generation: GPU out of memory")] * 2
    assert 'tgi_request_failure{err="generate"} 2.0' in metrics.render().decode()


def test_deadline_hit_while_queued(tokenizer):
    async def body(stub):
        unary = await stub.Generate(batch(["queued-timeout"], response=pb.ResponseOptions(input_text=True)))
        stream = [m async for m in stub.GenerateStream(req("queued-timeout"))]
        return unary, stream

    (unary, stream), _, metrics = run_with_server(tokenizer, body)
    [r] = unary.responses
    assert (r.text, r.generated_token_count, r.stop_reason) == ("", 0, pb.TIME_LIMIT)  # no input echo
    assert r.input_token_count == len(tokenizer("queued-timeout").input_ids)
    assert stream[-1].stop_reason == pb.TIME_LIMIT and stream[-1].input_token_count == 0
    text = metrics.render().decode()
    assert 'tgi_request_failure{err="timeout"} 2.0' in text and "tgi_request_success" not in text


def test_cancellation_closes_engine_streams_and_releases_permits(tokenizer):
    async def body(stub):
        unary = stub.Generate(batch(["slow one", "slow two"]))
        stream = stub.GenerateStream(req("slow three"))
        await stream.read()  # the first message: validated and submitted
        await asyncio.sleep(0.3)
        unary.cancel()
        stream.cancel()
        await asyncio.sleep(0.3)
        # all permits (2) are free again: a 2-input request is admitted
        return await stub.Generate(batch(["a", "b"]))

    resp, engine, metrics = run_with_server(tokenizer, body, max_concurrent=3)
    assert len(resp.responses) == 2
    assert sorted(engine.closed_early) == ["req-0", "req-1", "req-2"]
    assert 'tgi_request_failure{err="cancelled"} 3.0' in metrics.render().decode()


def test_empty_input_without_bos_is_refused_and_never_reaches_the_engine(tokenizer):
    """The GPT-2 tokenizer adds no BOS: an empty text has no position to generate from (TGIS' shard fails it with a
    tensor-shape error, as UNKNOWN); with a Llama tokenizer the same text is BOS alone and is served."""
    async def body(stub):
        out = []
        for call in (lambda: stub.Generate(batch(["fine", ""])), lambda: stub.GenerateStream(req("")).read()):
            try:
                await call()
            except grpc.aio.AioRpcError as err:
                out.append((err.code(), err.details()))
        return out

    codes, engine, _ = run_with_server(tokenizer, body)
    assert codes == [(grpc.StatusCode.INVALID_ARGUMENT, EMPTY_INPUT_MESSAGE)] * 2
    assert engine.requests == []


def test_overload(tokenizer):
    async def body(stub):
        slow = stub.GenerateStream(req("slow"))
        await slow.read()
        try:
            await stub.Generate(batch(["a", "b"]))
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details()
        finally:
            slow.cancel()

    result, _, metrics = run_with_server(tokenizer, body, max_concurrent=2)
    assert result == (grpc.StatusCode.RESOURCE_EXHAUSTED, "Model is overloaded")
    assert 'tgi_request_failure{err="conc_limit"} 1.0' in metrics.render().decode()


def test_http_health_and_metrics_endpoints(monkeypatch):
    state = {"healthy": False, "delay": 0.0}

    async def check() -> bool:
        await asyncio.sleep(state["delay"])
        if state["healthy"] is None:
            raise RuntimeError("engine thread died")
        return state["healthy"]

    async def main():
        server = HttpServer(health_metrics_app(check, lambda: b"tgi_queue_size 0.0\n"), "127.0.0.1", 0)
        await server.start()

        def get(path):
            return asyncio.to_thread(http_get, server.port, path)

        try:
            assert await get("/health") == (503, b'{"error":"unhealthy"}')
            state["healthy"] = True
            assert await get("/health") == (200, b"")
            state["healthy"] = None
            assert await get("/health") == (503, b'{"error":"unhealthy"}')
            state["healthy"], state["delay"] = True, 5.0
            monkeypatch.setattr(http_module, "HEALTH_TIMEOUT_S", 0.2)
            assert await get("/health") == (503, b'{"error":"Healthcheck timed-out"}')
            assert await get("/metrics") == (200, b"tgi_queue_size 0.0\n")
            assert await get("/generate") == (404, b"")
            assert await get("/v1/models") == (404, b"")  # nothing mounted
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 60))

"""The gRPC target: a running TGIS-compatible server through `GenerateStream` (time to first token on the wire)."""

from __future__ import annotations

import asyncio

import grpc

from proto import generation_pb2 as pb
from proto import generation_pb2_grpc as pb_grpc
from runtime.bench import prefix_cache
from runtime.bench.driver import RequestFailed, RequestRecord
from runtime.bench.errors import BenchError
from runtime.bench.workload import BenchRequest

CONNECT_TIMEOUT_S = 5.0


def default_metrics_url(address: str) -> str:
    """Where `tgis serve` puts /metrics next to gRPC on HOST:PORT: the same host, HTTP port 3000 (its default)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return f"http://{host}:3000/metrics"


def generation_request(request: BenchRequest) -> pb.SingleGenerationRequest:
    """The prompt as text; output length forced (at most, for guided requests: a completed schema stops). Token
    details on every message: TGIS suppresses messages whose text is held back (incomplete UTF-8, grapheme
    hold-back), which would make token timing depend on the text."""
    n = request.output_len
    params = pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=0 if request.guided else n),
        response=pb.ResponseOptions(generated_tokens=True))
    if request.guided is not None:
        params.decoding.json_schema = request.guided
    return pb.SingleGenerationRequest(request=pb.GenerationRequest(text=request.prompt_text), params=params)


class GrpcTarget:
    def __init__(self, address: str, tokenizer, metrics_url: str | None):
        self.address = address
        self.tokenizer = tokenizer
        self.metrics_url = metrics_url
        self.model_info: dict | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GenerationServiceStub | None = None

    async def __aenter__(self) -> GrpcTarget:
        self._channel = grpc.aio.insecure_channel(self.address)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT_S)
            self._stub = pb_grpc.GenerationServiceStub(self._channel)
            info = await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=CONNECT_TIMEOUT_S)
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            await self._channel.close()
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else f"none in {CONNECT_TIMEOUT_S:.0f} s"
            raise BenchError(f"--grpc {self.address}: no TGIS server answering ({detail})") from exc
        self.model_info = {"model_kind": pb.ModelInfoResponse.ModelKind.Name(info.model_kind),
                           "max_sequence_length": info.max_sequence_length, "max_new_tokens": info.max_new_tokens}
        return self

    async def __aexit__(self, *exc) -> None:
        if self._channel is not None:
            await self._channel.close()

    def describe(self) -> dict:
        return {"target": f"grpc://{self.address}", "server": self.model_info, "metrics_url": self.metrics_url}

    def prepare(self, requests: list[BenchRequest]) -> list[tuple[pb.SingleGenerationRequest, int]]:
        return [(generation_request(r), len(r.prompt_ids)) for r in requests]

    async def send(self, payload: tuple[pb.SingleGenerationRequest, int], record: RequestRecord) -> None:
        message, sent_tokens = payload
        record.prompt_tokens = sent_tokens
        try:
            async for msg in self._stub.GenerateStream(message):
                if msg.input_token_count:
                    record.prompt_tokens = msg.input_token_count
                record.tokens(msg.generated_token_count)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(exc.code().name, exc.details() or "") from exc

    async def prefix_cache(self) -> prefix_cache.Counters:
        return await prefix_cache.scrape(self.metrics_url)

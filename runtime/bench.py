"""Throughput and latency benchmark (nano-vllm style workload: random prompts, forced output lengths).

Two targets share one workload and one report: the in-process engine, or a running server over gRPC
(`GenerateStream`, so time-to-first-token is measured on the wire).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Workload:
    num_requests: int = 32
    input_len: tuple[int, int] = (16, 128)  # uniform range, tokens
    output_len: tuple[int, int] = (16, 64)
    concurrency: int = 16  # requests in flight at once
    seed: int = 0

    def sample(self, vocab_size: int) -> list[tuple[list[int], int]]:
        """(prompt ids, output length) per request; ids avoid the first 16 ids, where special tokens live."""
        rng = random.Random(self.seed)
        return [([rng.randrange(16, vocab_size) for _ in range(rng.randint(*self.input_len))],
                 rng.randint(*self.output_len)) for _ in range(self.num_requests)]


@dataclass
class RequestTiming:
    start: float
    first_token: float = 0.0
    end: float = 0.0
    tokens: int = 0


@dataclass
class Report:
    target: str
    requests: int
    input_tokens: int
    output_tokens: int
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    tpot_ms: dict[str, float] = field(default_factory=dict)  # time per output token after the first
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"mean": statistics.fmean(ordered) * 1000, "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize(target: str, items: list[tuple[list[int], int]], timings: list[RequestTiming], duration: float) -> Report:
    out_tokens = sum(t.tokens for t in timings)
    return Report(
        target=target, requests=len(items), input_tokens=sum(len(p) for p, _ in items), output_tokens=out_tokens,
        duration_s=duration, output_tokens_per_s=out_tokens / duration, requests_per_s=len(items) / duration,
        ttft_ms=_percentiles([t.first_token - t.start for t in timings]),
        tpot_ms=_percentiles([(t.end - t.first_token) / (t.tokens - 1) for t in timings if t.tokens > 1]),
        latency_ms=_percentiles([t.end - t.start for t in timings]),
    )


async def _drive(items: list[tuple[list[int], int]], concurrency: int,
                 one: Callable[[int, list[int], int, RequestTiming], object]) -> tuple[list[RequestTiming], float]:
    sem = asyncio.Semaphore(concurrency)
    timings = [RequestTiming(0.0) for _ in items]

    async def run(i: int) -> None:
        async with sem:
            timings[i].start = time.perf_counter()
            await one(i, *items[i], timings[i])
            timings[i].end = time.perf_counter()

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(len(items))))
    return timings, time.perf_counter() - t0


def bench_engine(engine, workload: Workload) -> Report:
    """Benchmark the in-process engine (output lengths forced with min_new_tokens)."""
    from runtime.engine.request import EngineRequest, GenerationParams

    items = workload.sample(len(engine.tokenizer))

    async def one(i: int, ids: list[int], n: int, timing: RequestTiming) -> None:
        req = EngineRequest(f"bench-{i}", ids, GenerationParams(max_new_tokens=n, min_new_tokens=n))
        async for out in engine.generate(req):
            if timing.tokens == 0:
                timing.first_token = time.perf_counter()
            timing.tokens = out.generated_token_count
            if out.error:
                raise RuntimeError(out.error)

    timings, duration = asyncio.run(_drive(items, workload.concurrency, one))
    return summarize("engine", items, timings, duration)


def bench_grpc(address: str, tokenizer, workload: Workload) -> Report:
    """Benchmark a running server through GenerateStream (prompts decoded back to text)."""
    import grpc

    from proto import generation_pb2 as pb
    from proto import generation_pb2_grpc as pb_grpc

    items = workload.sample(len(tokenizer))
    texts = [tokenizer.decode(ids) for ids, _ in items]

    async def main() -> tuple[list[RequestTiming], float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            async def one(i: int, ids: list[int], n: int, timing: RequestTiming) -> None:
                # token details on every message: TGIS suppresses messages whose text is held back (incomplete
                # UTF-8, grapheme hold-back), which would make token timing depend on the text
                params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n),
                                       response=pb.ResponseOptions(generated_tokens=True))
                req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=texts[i]), params=params)
                async for msg in stub.GenerateStream(req):
                    if msg.generated_token_count and timing.tokens == 0:
                        timing.first_token = time.perf_counter()
                    timing.tokens = max(timing.tokens, msg.generated_token_count)

            return await _drive(items, workload.concurrency, one)

    timings, duration = asyncio.run(main())
    return summarize(f"grpc://{address}", items, timings, duration)

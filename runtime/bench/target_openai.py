"""The OpenAI target: a server's `/v1/completions` with `stream: true` (server-sent events, one chunk per token or
so; the final usage chunk gives the exact token counts)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from runtime.bench import http, prefix_cache
from runtime.bench.driver import RequestFailed, RequestRecord
from runtime.bench.errors import BenchError
from runtime.bench.workload import BenchRequest

CONNECT_TIMEOUT_S = 5.0


def api_root(url: str) -> str:
    """`http://host:port` or `.../v1` → the `/v1` base the endpoints hang off."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def default_metrics_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/metrics"


def completion_body(request: BenchRequest, model: str) -> dict:
    """Greedy, output length forced with vLLM's `min_tokens` (at most, for guided requests); a guided request asks
    for its JSON schema as `response_format`."""
    body = {"model": model, "prompt": request.prompt_text, "max_tokens": request.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if request.guided is None:
        body["min_tokens"] = request.output_len
    else:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "bench", "schema": json.loads(request.guided)}}
    return body


class OpenAITarget:
    def __init__(self, url: str, tokenizer, metrics_url: str | None):
        self.url = url
        self.api = api_root(url)
        self.tokenizer = tokenizer
        self.metrics_url = metrics_url
        self.model: str | None = None

    async def __aenter__(self) -> OpenAITarget:
        """The served model's name (the first of /v1/models): requests must name it."""
        try:
            status, body = await http.get(f"{self.api}/models", CONNECT_TIMEOUT_S)
            self.model = json.loads(body)["data"][0]["id"] if status == 200 else None
        except (OSError, ValueError, TimeoutError, KeyError, IndexError, TypeError) as exc:
            raise BenchError(f"--openai {self.url}: no OpenAI-compatible server answering ({exc})") from exc
        if self.model is None:
            raise BenchError(f"--openai {self.url}: GET {self.api}/models answered HTTP {status}")
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    def describe(self) -> dict:
        return {"target": self.url, "server": {"model": self.model}, "metrics_url": self.metrics_url}

    def prepare(self, requests: list[BenchRequest]) -> list[tuple[BenchRequest, int]]:
        return [(r, len(r.prompt_ids)) for r in requests]

    async def send(self, payload: tuple[BenchRequest, int], record: RequestRecord) -> None:
        request, sent_tokens = payload
        record.prompt_tokens = sent_tokens
        try:
            response = await http.request(f"{self.api}/completions", "POST", completion_body(request, self.model),
                                          headers={"Accept": "text/event-stream"})
        except OSError as exc:
            raise RequestFailed("CONNECTION_ERROR", str(exc)) from exc
        try:
            if response.status != 200:
                text = (await response.body()).decode("utf-8", errors="replace")
                raise RequestFailed(f"HTTP {response.status}", text[:500])
            usage = await _read_events(response, record)
        except OSError as exc:
            raise RequestFailed("CONNECTION_ERROR", str(exc)) from exc
        finally:
            response.close()
        if usage:
            record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
            record.output_tokens = usage.get("completion_tokens") or record.output_tokens

    async def prefix_cache(self) -> prefix_cache.Counters:
        return await prefix_cache.scrape(self.metrics_url)


async def _read_events(response: http.Response, record: RequestRecord) -> dict | None:
    """Count text chunks as tokens as they arrive; the usage object of the stream, if it sends one."""
    usage, chunks = None, 0
    async for line in response.lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise RequestFailed("BAD_STREAM", f"not JSON: {data[:200]}") from exc
        if "error" in event:
            raise RequestFailed("STREAM_ERROR", json.dumps(event["error"])[:500])
        if any(choice.get("text") for choice in event.get("choices") or []):
            chunks += 1
            record.tokens(chunks)
        usage = event.get("usage") or usage
    return usage

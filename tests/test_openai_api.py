"""The OpenAI API of the real `tgis serve` (tiny Llama, S=512, server max_new_tokens 400, 8 permits), driven by the
official `openai` client: completions and chat, unary and streaming, parity with gRPC Generate, stop strings, usage,
logprobs, n and seeds, errors (400/404/429), client disconnects, idle connections, and /health + /metrics beside it."""

from __future__ import annotations

import http.client
import json
import socket
import time

import openai
import pytest
from server_harness import running_server
from transformers import AutoTokenizer

from proto import generation_pb2 as pb

S, MAX_NEW, PERMITS = 512, 400, 8
T = 60  # per-request timeout (s)
PROMPTS = ["Hello world, this is", "def f(x):\n    return", "Unicode: café naïve 中文"]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("openai-server"), "--max-sequence-length", str(S),
                        "--max-new-tokens", str(MAX_NEW), "--max-concurrent-requests", str(PERMITS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0,
                       timeout=T) as c:
        yield c


@pytest.fixture(scope="module")
def model(model_dir) -> str:
    return str(model_dir)


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield server.stub(channel)


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def grpc_greedy(stub, text: str, max_new_tokens: int, **response) -> pb.GenerationResponse:
    [r] = stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)], params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens), response=pb.ResponseOptions(**response))),
        timeout=T).responses
    return r


def post(server, path: str, body: dict | bytes, timeout: float = T) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)
    try:
        conn.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body))
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_models_lists_the_served_model(client, model, server):
    assert [m.id for m in client.models.list().data] == [model]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert err.value.status_code == 404 and err.value.code == "model_not_found" and "gpt-4" in err.value.message
    status, body = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **GREEDY})  # no model: served
    assert status == 200 and body["model"] == model and body["usage"]["completion_tokens"] == 2


def test_completion_greedy_equals_grpc_generate(client, model, stub):
    for prompt in PROMPTS:
        r = grpc_greedy(stub, prompt, 12)
        c = client.completions.create(model=model, prompt=prompt, max_tokens=12, **GREEDY)
        [choice] = c.choices
        assert choice.text == r.text and choice.finish_reason == "length"
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (r.input_token_count, r.generated_token_count)
        assert c.usage.total_tokens == r.input_token_count + 12


def test_completion_stream_equals_unary_with_usage(client, model):
    for prompt in PROMPTS:
        unary = client.completions.create(model=model, prompt=prompt, max_tokens=10, **GREEDY)
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=10, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
        *deltas, last = chunks
        assert "".join(ch.choices[0].text for ch in deltas) == unary.choices[0].text
        assert deltas[-1].choices[0].finish_reason == "length"
        assert last.choices == [] and last.usage == unary.usage


def test_chat_uses_the_chat_template(client, model, tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    ids = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(ids, add_special_tokens=False).input_ids  # the template holds the BOS
    reference = client.completions.create(model=model, prompt=ids, max_tokens=8, **GREEDY).choices[0].text
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, **GREEDY)
    assert chat.choices[0].message.content == reference and chat.choices[0].message.role == "assistant"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), 8)
    stream = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == reference
    assert stream[-1].usage == chat.usage and stream[-2].choices[0].finish_reason == "length"


def test_stop_strings(client, model, stub):
    prompt = PROMPTS[0]
    full = grpc_greedy(stub, prompt, 16).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = full[:full.index(stop)]
    for stops in (stop, [stop, "never appears"]):
        [choice] = client.completions.create(model=model, prompt=prompt, max_tokens=16, stop=stops, **GREEDY).choices
        assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == (expected, "stop", stop)
    streamed = client.completions.create(model=model, prompt=prompt, max_tokens=16, stop=stop, stream=True,
                                         **GREEDY)
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"
    kept = client.completions.create(model=model, prompt=prompt, max_tokens=16, stop=stop, **GREEDY,
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == expected + stop


def test_logprobs_match_grpc_token_details(client, model, stub, tok):
    prompt = PROMPTS[1]
    r = grpc_greedy(stub, prompt, 6, generated_tokens=True, token_logprobs=True, top_n_tokens=2)
    c = client.completions.create(model=model, prompt=prompt, max_tokens=6, logprobs=2, **GREEDY)
    lp = c.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in r.tokens], abs=1e-5)
    assert lp.tokens == [tok.decode([tok.convert_tokens_to_ids(t.text)]) for t in r.tokens]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=5,
                                          logprobs=True, top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert 1 <= len(entry.top_logprobs) <= 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.bytes == list(entry.token.encode())


def test_n_choices_and_seeds(client, model):
    kwargs = {"model": model, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 1.0}
    first = client.completions.create(n=3, seed=7, **kwargs)
    again = client.completions.create(n=3, seed=7, **kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1  # each choice has its own seed: 7, 8, 9
    assert client.completions.create(seed=8, **kwargs).choices[0].text == texts[1]
    assert first.usage.completion_tokens == 18 and first.usage.prompt_tokens == again.usage.prompt_tokens
    batch = client.completions.create(model=model, prompt=PROMPTS[:2], n=2, max_tokens=4, **GREEDY)
    texts = [c.text for c in batch.choices]  # prompt-major order; greedy choices of one prompt agree
    assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3]


@pytest.mark.parametrize(("endpoint", "params", "param", "message"), [
    ("completions", {"temperature": 0.01}, "temperature", "temperature must be >= 0.05"),
    ("completions", {"top_p": 1.5}, "top_p", "top_p must be > 0.0 and <= 1.0"),
    ("completions", {"max_tokens": MAX_NEW + 1}, "max_tokens", f"max_tokens must be <= {MAX_NEW}"),
    ("completions", {"stop": ["a", ""]}, "stop", "can specify at most 6 non-empty stop sequences, each not more "
                                                  "than 240 UTF8 bytes"),
    ("completions", {"stop": ["s"] * 7}, "stop", "can specify at most 6 non-empty stop sequences"),
    ("completions", {"presence_penalty": 0.5}, "presence_penalty", "presence_penalty is not supported"),
    ("chat", {"frequency_penalty": 1}, "frequency_penalty", "frequency_penalty is not supported"),
    ("completions", {"extra_body": {"repetition_penalty": 0}}, "repetition_penalty",
     "repetition_penalty must be > 0.0"),
    ("completions", {"extra_body": {"min_tokens": 20}, "max_tokens": 10}, "min_tokens",
     "min_tokens must be <= max_tokens"),
    ("completions", {"logit_bias": {"5": 10}}, "logit_bias", "logit_bias is not supported"),
    ("completions", {"prompt": "word " * 600}, "prompt", "plus prefix length (0) must be < 512"),
    ("completions", {"prompt": [5, 99999]}, "prompt", "token ids must be >= 0 and < 1024"),
    ("completions", {"prompt": []}, "prompt", "prompt must not be empty"),
    ("completions", {"n": 0}, "n", "Input should be greater than or equal to 1"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "response_format json_schema needs a `schema`"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", 'invalid guided decoding json_schema: Unsupported type "foo"'),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "only text content parts are supported"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "top_logprobs requires logprobs to be true"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools and function calling"),
])
def test_bad_parameters_are_400_with_a_message(client, model, server, endpoint, params, param, message):
    before = server.metrics()
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            client.chat.completions.create(**{"model": model, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 4, **params})
        else:
            client.completions.create(**{"model": model, "prompt": "hi", "max_tokens": 4, **params})
    assert err.value.status_code == 400 and message in err.value.message
    assert err.value.param == param and err.value.type == "invalid_request_error"
    if "Input should be" not in message:  # a value TGIS' validation (or the API) refused, not a malformed body
        assert delta(server.metrics(), before, 'tgi_request_failure{err="validation"}') == 1


def test_malformed_bodies_are_400(server):
    assert post(server, "/v1/completions", b"{not json")[0] == 400
    status, body = post(server, "/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages" and body["error"]["type"] == "invalid_request_error"
    status, body = post(server, "/v1/completions", b"x" * ((4 << 20) + 100))
    assert status == 413 and "request body larger than" in body["error"]["message"]


def test_overload_is_429(client, model, server):
    before = server.metrics()
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=1, n=PERMITS + 1)
    assert err.value.status_code == 429 and err.value.code == "model_overloaded"
    assert err.value.body["message"] == "Model is overloaded"
    assert delta(server.metrics(), before, 'tgi_request_failure{err="conc_limit"}') == 1


def test_client_disconnect_mid_stream_aborts_the_request(client, model, server):
    before = server.metrics()
    long = {"model": model, "prompt": "Tell me a story", "max_tokens": MAX_NEW, "extra_body": {"min_tokens": MAX_NEW}}
    stream = client.completions.create(stream=True, **long, **GREEDY)
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    # a unary request whose client gives up is aborted too
    # it gives up after 0.1 s: 400 forced tokens take longer than that on any CPU (a step costs ~1 ms or more)
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=0.1)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Once upon a time", "max_tokens": MAX_NEW,
                                                             "min_tokens": MAX_NEW, **GREEDY}))
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    deadline = time.monotonic() + 20
    while delta(server.metrics(), before, 'tgi_request_failure{err="cancelled"}') < 2:
        assert time.monotonic() < deadline, "the disconnects were not noticed"
        time.sleep(0.1)
    started = time.monotonic()
    c = client.completions.create(model=model, prompt="hi", max_tokens=3, **GREEDY)  # served at once
    assert c.usage.completion_tokens == 3 and time.monotonic() - started < 10
    after = server.metrics()
    assert delta(after, before, 'tgi_request_success{kind="openai",stop_reason="MAX_TOKENS"}') == 1  # only the last
    assert delta(after, before, 'tgi_request_success{kind="openai_stream",stop_reason="MAX_TOKENS"}') == 0
    assert after["tgi_batch_current_size"] <= 1  # the aborted requests left the batch


def test_idle_connections_hold_no_threads_and_are_closed(server):
    def threads() -> int:
        status = open(f"/proc/{server.proc.pid}/status").read()
        return int(status.split("Threads:", 1)[1].split()[0])

    before = threads()
    idle = [socket.create_connection(("127.0.0.1", server.http_port), timeout=T) for _ in range(200)]
    half = socket.create_connection(("127.0.0.1", server.http_port), timeout=T)
    half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a request head that never ends
    try:
        started = time.monotonic()
        assert server.http("/health") == (200, b"")
        assert time.monotonic() - started < 5
        assert threads() <= before + 2
        for sock in [*idle, half]:  # the server closes each after its idle timeout (5 s)
            assert sock.recv(1) == b""
    finally:
        for sock in [*idle, half]:
            sock.close()


def test_health_and_metrics_unchanged(server):
    assert server.http("/health") == (200, b"")
    for path in ("/nope", "/docs", "/openapi.json", "/v1", "/health/"):
        assert server.http(path) == (404, b"")
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=T)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == \
        "text/plain; version=0.0.4; charset=utf-8"
    text = response.read().decode()
    conn.close()
    for line in ('tgi_request_count{kind="openai"}', 'tgi_request_count_total{kind="openai"}',
                 'tgi_request_success{kind="openai",stop_reason="MAX_TOKENS"}', "tgi_request_duration_bucket"):
        assert line in text


def test_response_format_is_guided_decoding(client, model):
    """json_object: any JSON object; json_schema: its schema (both through the engine's guided decoding)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    for response_format in ({"type": "json_object"},
                            {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}):
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "a number"}],
                                             max_tokens=60, temperature=0, response_format=response_format)
        if out.choices[0].finish_reason == "stop":
            value = json.loads(out.choices[0].message.content)
            assert isinstance(value, dict)
            if response_format["type"] == "json_schema":
                assert set(value) == {"n"} and isinstance(value["n"], int)
        else:  # a random tiny model may not close the object within the limit; what it wrote is a JSON prefix
            assert out.choices[0].message.content.lstrip().startswith("{")

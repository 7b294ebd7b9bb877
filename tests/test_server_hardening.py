"""The real `tgis serve` as a hostile client sees it (tiny Llama, S=96, server max_new_tokens 64, a prefix store
with a prompt prefix, a LoRA adapter and broken adapters, one tokenization worker).

A hypothesis fuzz drives every field of Generate, GenerateStream and Tokenize and checks each answer against an
independent reading of the spec (tests/tgis_oracle.py) while a bystander request keeps getting exactly its
reference text (500 cases, derandomized; FUZZ_EXAMPLES=3000 for a longer hunt). Then the findings one by one:
garbage wire bytes, ids too long for a file name, adapter configs that cannot be used, the top_n_tokens cap,
tokenization beside the event loop, cancellations during validation, oversized requests, and a SIGTERM with streams
nobody reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import tgis_oracle as oracle
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from lora_utils import write_lora
from server_harness import REPO, running_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from proto import generation_pb2 as pb

S, MAX_NEW, MAX_TOP_N, VOCAB_DIM = 96, 64, 10, 64
T = 60  # per-RPC timeout (s)
BYSTANDER = "The quick brown fox jumps over"
STORE_FAILURES = {  # adapters in the store that cannot be used, and what the client is told
    "listcfg": "can't load adapter 'listcfg': adapter_config.json must hold a JSON object, not a list",
    "norank": "can't load adapter 'norank': adapter_config.json needs a positive integer r (the LoRA rank)",
    "badjson": "can't load adapter 'badjson': adapter_config.json is not valid JSON (Expecting property name "
               "enclosed in double quotes: line 1 column 2 (char 1))",
    "ia3": "adapter type IA3 is not currently supported",
    "p" * 256: f"can't retrieve prompt prefix with id '{'p' * 100}... (256 characters)': Unexpected <class "
               f"'Exception'>: Invalid prefix id {'p' * 100}... (256 characters), too long (at most 255 bytes between "
               "slashes)",
}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def store(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(5)
    (root / "tuned").mkdir()
    torch.save(torch.randn(4, VOCAB_DIM) * 0.5, root / "tuned" / "decoder.pt")
    write_lora(root / "lora", AutoModelForCausalLM.from_pretrained(model_dir), ["q_proj", "v_proj"], seed=2)
    configs = {"listcfg": "[]", "norank": json.dumps({"peft_type": "LORA"}), "badjson": "{",
               "ia3": json.dumps({"peft_type": "IA3"})}
    for name, text in configs.items():
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text(text)
    return root


@pytest.fixture(scope="module", params=["false", "true"], ids=["sync", "async-scheduling"])
def server(model_dir, store, tmp_path_factory, request):
    """The synchronous engine loop (the CPU default) and async scheduling (the GPU default)."""
    with running_server(model_dir, tmp_path_factory.mktemp("hardening"), "--max-sequence-length", str(S),
                        "--max-new-tokens", str(MAX_NEW), "--max-batch-size", "8", "--tokenization-workers", "1",
                        "--prefix-store-path", str(store), "--async-scheduling", request.param) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with server.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(server, channel):
    return server.stub(channel)


def generate(stub, text: str, **request) -> pb.BatchedGenerationRequest:
    params = request.pop("params", pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4)))
    return stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)], params=params,
                                                     **request), timeout=T)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


# ---- the fuzz ---------------------------------------------------------------------------------------------------
IDS = ["", "tuned", "lora", "missing", "nested/missing", "bad id", "../up", "/abs", "tuned/", *STORE_FAILURES]
TEXTS = st.one_of(
    st.sampled_from(["", " ", "\n", "Hello world", "café naïve 中文 😀", "word " * 40, "x" * 300, "<s></s>"]),
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=24),
)
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 0.01, 0.049, 0.05, 0.5, 1.0, 1.0001, 2.0, 10.0, 10.5, -1.0,
                                    float("nan"), float("inf"), float("-inf"), 1e-30]),
                   st.floats(-2, 12, width=32))
U32 = [0, 1, 2, 5, 2**31 - 1, 2**31, 2**32 - 1]
STOPS = st.one_of(st.sampled_from(["", "a", "the", "x" * 240, "x" * 241, "é" * 120, "é" * 121]), TEXTS)


def _optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def parameters(draw, hostile: bool) -> pb.Parameters | None:
    """Every field, each value drawn from its edges (most of them invalid) in a hostile case, else from ordinary
    values, so that both validation and generation see plenty of traffic."""
    if draw(st.integers(0, 9)) == 0:
        return None

    def pick(edge, ordinary):
        return draw(edge if hostile else ordinary)

    p = pb.Parameters(method=draw(st.sampled_from([pb.GREEDY, pb.SAMPLE, pb.SAMPLE, 7])),
                      truncate_input_tokens=pick(st.sampled_from([0, 1, 3, S - 1, S, 2**32 - 1]),
                                                 st.sampled_from([0, 0, 2, 8])))
    if draw(st.booleans()):
        sampling = pb.SamplingParameters(top_k=pick(st.sampled_from(U32), st.integers(0, 50)),
                                         top_p=pick(FLOATS, st.floats(0.05, 1.0)),
                                         typical_p=pick(FLOATS, st.floats(0.0, 1.0)))
        temperature = pick(_optional(FLOATS), _optional(st.floats(0.05, 3.0)))
        seed = draw(_optional(st.sampled_from([0, 7, 2**64 - 1])))
        for name, value in (("temperature", temperature), ("seed", seed)):
            if value is not None:
                setattr(sampling, name, value)
        p.sampling.CopyFrom(sampling)
    p.stopping.max_new_tokens = pick(st.sampled_from([0, 1, 20, MAX_NEW, MAX_NEW + 1, 2**32 - 1]), st.integers(0, 12))
    p.stopping.min_new_tokens = pick(st.sampled_from([0, 1, 21, MAX_NEW, 2**32 - 1]), st.integers(0, 4))
    p.stopping.time_limit_millis = pick(st.sampled_from([1, 30, 2**32 - 1]), st.sampled_from([0, 0, 0, 500]))
    p.stopping.stop_sequences.extend(pick(st.lists(STOPS, max_size=8), st.lists(TEXTS.filter(
        lambda t: 0 < len(t.encode()) <= 240), max_size=3)))
    include = draw(_optional(st.booleans()))
    if include is not None:
        p.stopping.include_stop_sequence = include
    for name in ("input_text", "generated_tokens", "input_tokens", "token_logprobs", "token_ranks"):
        setattr(p.response, name, draw(st.booleans()))
    p.response.top_n_tokens = pick(st.sampled_from([1, 2, MAX_TOP_N, MAX_TOP_N + 1, 2**32 - 1]),
                                   st.sampled_from([0, 0, 0, 2]))
    if hostile or p.response.token_logprobs or p.response.token_ranks or p.response.top_n_tokens:
        p.response.generated_tokens |= not hostile  # ordinary requests ask for details the valid way
    p.decoding.repetition_penalty = pick(FLOATS, st.sampled_from([0.0, 1.0, 1.2]))
    if draw(st.booleans()):
        p.decoding.length_penalty.start_index = pick(st.sampled_from(U32), st.integers(0, 8))
        p.decoding.length_penalty.decay_factor = pick(FLOATS, st.floats(1.0, 10.0))
    guided = draw(st.sampled_from([None] * 9 + ["format", "json_schema", "regex", "choice", "grammar"]))
    if guided == "choice":
        p.decoding.choice.choices.extend(["yes", "no"])
    elif guided == "format":
        p.decoding.format = pb.DecodingParameters.JSON
    elif guided:
        setattr(p.decoding, guided, '{"type": "object"}' if guided == "json_schema" else "a|b")
    return p


@st.composite
def fuzz_case(draw):
    hostile = draw(st.booleans())
    params = draw(parameters(hostile))
    texts = draw(st.lists(TEXTS, min_size=0 if hostile else 1, max_size=3))
    ordinary_ids = ["", "", "", "tuned", "lora"]
    ids = {"model_id": draw(st.sampled_from(["", "any", "x" * 300])),
           "prefix_id": draw(st.sampled_from(IDS if hostile else ordinary_ids)),
           "adapter_id": draw(st.sampled_from(["", "", "", "nested/missing", "bad id"] if hostile else ordinary_ids))}
    tokenize = pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=t) for t in texts],
                                         return_tokens=draw(st.booleans()), return_offsets=draw(st.booleans()),
                                         truncate_input_tokens=draw(st.sampled_from([0, 1, 4, 2**32 - 1])), **ids)
    missing_request = draw(st.sampled_from([False] * 7 + [True]))
    return params, texts, ids, missing_request, tokenize


class Bystander:
    """A valid stream run over and over beside the fuzz traffic: it must get its reference text every time."""

    def __init__(self, stub):
        self.stub, self.request = stub, pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text=BYSTANDER),
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=12, min_new_tokens=12)))
        self.reference = self.run()
        self.runs, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def run(self) -> str:
        return "".join(m.text for m in self.stub.GenerateStream(self.request, timeout=T))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                text = self.run()
            except grpc.RpcError as exc:
                text = f"{exc.code()}: {exc.details()}"
            self.runs += 1
            if text != self.reference:
                self.failures.append(text)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2 * T)


def _outcome(call) -> tuple[grpc.StatusCode, str | None, object]:
    try:
        return grpc.StatusCode.OK, None, call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), None


def _check_unary(case, response, tokenizer, store: oracle.Store) -> None:
    params, texts, ids, _, _ = case
    request = pb.BatchedGenerationRequest(params=params, **ids) if params else pb.BatchedGenerationRequest(**ids)
    e = oracle.effective(request)
    prefix, _ = oracle.prefix_lookup(request.adapter_id or request.prefix_id, store)
    truncate = params.truncate_input_tokens if params else 0
    assert len(response.responses) == len(texts)
    for text, r in zip(texts, response.responses, strict=True):
        n = oracle.input_length(tokenizer, text, truncate)
        assert r.input_token_count == n
        assert r.generated_token_count <= oracle.max_tokens(n, prefix, e, S)
        assert r.stop_reason not in (pb.NOT_FINISHED, pb.ERROR, pb.CANCELLED)
        if params and params.response.generated_tokens:
            assert len(r.tokens) == r.generated_token_count
            assert all(len(t.top_tokens) <= oracle.top_n_bound(e, len(tokenizer)) for t in r.tokens)
        if params and params.response.input_tokens and r.generated_token_count:
            assert len(r.input_tokens) == n + prefix
        if not e.sampling:
            assert r.seed == 0


def _check_stream(case, messages, tokenizer, store: oracle.Store) -> None:
    params, texts, ids, _, _ = case
    first, final = messages[0], messages[-1]
    truncate = params.truncate_input_tokens if params else 0
    assert first.input_token_count == oracle.input_length(tokenizer, texts[0] if texts else "", truncate)
    assert final.stop_reason not in (pb.NOT_FINISHED, pb.ERROR, pb.CANCELLED)
    assert all(m.stop_reason == pb.NOT_FINISHED for m in messages[:-1])


def _check_tokenize(request: pb.BatchedTokenizeRequest, response, tokenizer) -> None:
    assert len(response.responses) == len(request.requests)
    for item, r in zip(request.requests, response.responses, strict=True):
        n = len(tokenizer(item.text)["input_ids"])
        t = request.truncate_input_tokens
        assert r.token_count == (t if 0 < t < n else n)
        assert len(r.tokens) == (r.token_count if request.return_tokens else 0)
        assert len(r.offsets) == (r.token_count if request.return_offsets else 0)


@pytest.fixture(scope="module")
def oracle_store(store) -> oracle.Store:
    return oracle.Store(prefixes={"tuned": 4, "tuned/": 4}, loras={"lora"}, failures=dict(STORE_FAILURES))


def test_fuzzed_requests_get_the_spec_answers_and_never_hurt_a_bystander(stub, tokenizer, oracle_store):
    seen: dict[str, int] = {}

    @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 500)), derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=fuzz_case())
    def one(case):
        params, texts, ids, missing_request, tokenize = case
        unary = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=t) for t in texts], **ids)
        single = pb.SingleGenerationRequest(**ids)
        if params is not None:
            unary.params.CopyFrom(params)
            single.params.CopyFrom(params)
        if not missing_request:
            single.request.text = texts[0] if texts else ""
        with ThreadPoolExecutor(3) as pool:  # the three RPCs of one case run at the same time
            calls = [pool.submit(_outcome, lambda: stub.Generate(unary, timeout=T)),
                     pool.submit(_outcome, lambda: list(stub.GenerateStream(single, timeout=T))),
                     pool.submit(_outcome, lambda: stub.Tokenize(tokenize, timeout=T))]
            (u_code, u_msg, u_resp), (s_code, s_msg, s_msgs), (t_code, t_msg, t_resp) = [c.result() for c in calls]
        def verdict(request, inputs):
            return oracle.verdict(request, inputs, tokenizer, oracle_store, S, MAX_NEW, MAX_TOP_N)

        expected_unary = verdict(unary, texts) if texts else None
        expected_stream = (grpc.StatusCode.INVALID_ARGUMENT, "missing request") if not single.HasField("request") \
            else verdict(single, [single.request.text])
        for kind, code, message, expected in (("Generate", u_code, u_msg, expected_unary),
                                              ("GenerateStream", s_code, s_msg, expected_stream)):
            assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (kind, message)
            if expected == oracle.GUIDED:
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (kind, message)
                continue
            want = (grpc.StatusCode.OK, None) if expected is None else expected
            assert code == want[0], (kind, message, want)
            if want[1] is not None:
                assert message == want[1], kind
            seen[f"{kind} {code.name}"] = seen.get(f"{kind} {code.name}", 0) + 1
        assert t_code == grpc.StatusCode.OK, t_msg
        _check_tokenize(tokenize, t_resp, tokenizer)
        if u_resp is not None:
            _check_unary(case, u_resp, tokenizer, oracle_store)
        if s_msgs is not None:
            _check_stream(case, s_msgs, tokenizer, oracle_store)

    with Bystander(stub) as bystander:
        one()
    assert bystander.runs > 0 and bystander.failures == []
    # the fuzz reached both sides of every RPC
    assert all(seen.get(f"{kind} {code}", 0) >= 10 for kind in ("Generate", "GenerateStream")
               for code in ("OK", "INVALID_ARGUMENT")), seen


# ---- the findings -----------------------------------------------------------------------------------------------
def test_garbage_wire_bytes_are_invalid_argument(stub, channel):
    cases = {
        "/fmaas.GenerationService/Generate": (b"\xff\xff\xff", "malformed fmaas.BatchedGenerationRequest: the bytes "
                                                                "are not a valid protobuf message"),
        "/fmaas.GenerationService/Tokenize": (b"\x12\x03\x0a\x01\xff", "malformed fmaas.BatchedTokenizeRequest: a "
                                                                        "string field is not valid UTF-8"),
        "/fmaas.GenerationService/ModelInfo": (b"\x0a\x05ab", "malformed fmaas.ModelInfoRequest: the bytes are not a "
                                                              "valid protobuf message"),
    }
    for method, (raw, message) in cases.items():
        err = rpc_error(lambda m=method, r=raw: channel.unary_unary(m)(r, timeout=T))
        assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    stream = channel.unary_stream("/fmaas.GenerationService/GenerateStream")
    bad_text = b"\x1a\x03\x12\x01\xc3"  # request.text = a truncated two-byte character
    err = rpc_error(lambda: list(stream(bad_text, timeout=T)))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed "
                                           "fmaas.SingleGenerationRequest: a string field is not valid UTF-8")
    assert generate(stub, "still serving").responses[0].generated_token_count == 4


def test_ids_too_long_for_a_file_name_are_short_invalid_arguments(stub, store):
    for field in ("prefix_id", "adapter_id"):
        unary = rpc_error(lambda f=field: generate(stub, "hi", **{f: "y" * 5000}))
        stream = rpc_error(lambda f=field: list(stub.GenerateStream(pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text="hi"), **{f: "y" * 5000}), timeout=T)))
        for err in (unary, stream):  # not RESOURCE_EXHAUSTED: the echoed id is cut short
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details().startswith(f"can't retrieve prompt prefix with id '{'y' * 100}... (5000 "
                                            "characters)'")
            assert len(err.details()) < 500 and str(store) not in err.details()
    nested = rpc_error(lambda: generate(stub, "hi", prefix_id="ok/" + "z" * 300))
    assert "too long (at most 255 bytes between slashes)" in nested.details() and str(store) not in nested.details()


def test_adapters_that_cannot_be_used_are_named_plainly(stub, server):
    before = server.metrics().get("tgi_prompt_load_failure_total", 0)
    for adapter_id, message in STORE_FAILURES.items():
        err = rpc_error(lambda a=adapter_id: generate(stub, "hi", adapter_id=a))
        assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert server.metrics()["tgi_prompt_load_failure_total"] - before == 1  # only the long id reached the prefix store
    assert generate(stub, "hi", adapter_id="lora").responses[0].generated_token_count == 4


def test_empty_text_on_llama_generates_from_bos_beside_others(stub):
    """TGIS counts empty text on Llama as 1 token (BOS); with input details, in a batch beside a normal input."""
    details = pb.ResponseOptions(input_tokens=True, generated_tokens=True, token_logprobs=True, top_n_tokens=2)
    response = stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=""), pb.GenerationRequest(text="Hello world")],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=3), response=details)), timeout=T)
    empty, other = response.responses
    assert (empty.input_token_count, [t.text for t in empty.input_tokens]) == (1, ["<s>"])
    assert empty.generated_token_count == 3 and other.generated_token_count == 3
    assert len(other.input_tokens) == other.input_token_count


def test_top_n_tokens_is_capped_and_every_position_bounded(stub):
    def ask(n: int):
        return generate(stub, "Hello world", params=pb.Parameters(
            stopping=pb.StoppingCriteria(max_new_tokens=3), response=pb.ResponseOptions(
                input_tokens=True, generated_tokens=True, token_logprobs=True, top_n_tokens=n)))

    [r] = ask(MAX_TOP_N).responses
    for info in [*r.input_tokens[1:], *r.tokens]:
        assert MAX_TOP_N <= len(info.top_tokens) <= 4 * MAX_TOP_N
    err = rpc_error(lambda: ask(MAX_TOP_N + 1))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                           f"top_n_tokens ({MAX_TOP_N + 1}) must be <= {MAX_TOP_N}")


def test_tokenization_runs_beside_the_event_loop_and_cancelling_it_counts(stub, server, tokenizer):
    """Megabyte texts queue on the (single) tokenization worker while ModelInfo answers at once; a Generate waiting
    behind them and cancelled by its client is counted as cancelled, as one cancelled in the engine is."""
    big = "hello world, this is some text. " * 32_000  # 1 MB
    counted = server.metrics()
    with ThreadPoolExecutor(3) as pool:
        tokenizing = [pool.submit(stub.Tokenize, pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=big)]),
                                  timeout=4 * T) for _ in range(3)]
        _wait(lambda: _delta(server, counted, "tgi_tokenize_request_count") == 3)
        stub.ModelInfo(pb.ModelInfoRequest(), timeout=T)
        assert not all(f.done() for f in tokenizing), "ModelInfo waited for the tokenization"
        queued = stub.Generate.future(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=big)]),
                                      timeout=4 * T)
        _wait(lambda: _delta(server, counted, 'tgi_request_count{kind="single"}') == 1)
        assert not queued.done()
        queued.cancel()
        _wait(lambda: _delta(server, counted, 'tgi_request_failure{err="cancelled"}') == 1)
        counts = [f.result().responses[0].token_count for f in tokenizing]
    assert counts == [len(tokenizer(big)["input_ids"])] * 3
    assert _delta(server, counted, 'tgi_request_failure{err="validation"}') == 0


def _delta(server, before: dict[str, float], key: str) -> float:
    return server.metrics().get(key, 0) - before.get(key, 0)


def _wait(condition, timeout: float = 4 * T) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_request_over_the_size_limit_is_resource_exhausted(stub):
    err = rpc_error(lambda: generate(stub, "x" * (5 << 20)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.details()


# ---- shutdown ---------------------------------------------------------------------------------------------------
IDLE_CLIENT = """
import sys, grpc
from proto import generation_pb2 as pb, generation_pb2_grpc as pb_grpc
stub = pb_grpc.GenerationServiceStub(grpc.insecure_channel(sys.argv[1]))
req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text="Tell me a story"), params=pb.Parameters(
    stopping=pb.StoppingCriteria(max_new_tokens=400, min_new_tokens=400)))
calls = [stub.GenerateStream(req) for _ in range(int(sys.argv[2]))]
for call in calls:
    next(call), next(call)
print("streaming", flush=True)
sys.stdin.read()
"""


def test_sigterm_with_streams_nobody_reads_exits_after_the_grace_period(model_dir, tmp_path):
    """A client that stopped reading 16 long streams: once the grace period is over (none here, so that no stream
    can finish meanwhile) their handlers are cancelled (grpcio leaves them waiting on the engine), their engine
    requests aborted, and server and engine exit cleanly."""
    with running_server(model_dir, tmp_path, "--max-batch-size", "16", "--shutdown-grace-period", "0") as server:
        client = subprocess.Popen([sys.executable, "-c", IDLE_CLIENT, server.target, "16"], cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            assert client.stdout.readline().strip() == "streaming"
            engine_pids = _children(server.proc.pid)
            server.signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert server.wait(timeout=T) == 0
            assert time.monotonic() - signalled < 30  # nothing waits for the engine's 16 x 400 tokens
        finally:
            client.kill()
            client.wait(timeout=T)
        _wait(lambda: not any(_alive(pid) for pid in engine_pids), timeout=20)
    logs = server.logs()
    assert "Shutdown complete" in logs and "Traceback" not in logs
    assert logs.count("1 request(s) cancelled") == 16


def _children(pid: int) -> list[int]:
    """Child processes of every thread of `pid` (the engine process is started from a worker thread)."""
    tasks = os.listdir(f"/proc/{pid}/task")
    return [int(c) for t in tasks for c in open(f"/proc/{pid}/task/{t}/children").read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False

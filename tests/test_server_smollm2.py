"""`tgis serve` with the real SmolLM2-135M-Instruct (float32, S=200, max_new_tokens 169, as TGIS' own tests):
greedy parity with transformers, TOKEN_LIMIT clamping, the README's gRPC and OpenAI client examples (a real chat
answer through the chat template), guided decoding (each option of `oneof guided`, unary and streaming, bad specs
answered INVALID_ARGUMENT), and a graceful SIGTERM during a running stream (last: it stops the shared server)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import grpc
import jsonschema
import pytest
import torch
from server_harness import REPO, running_server
from test_guided import PERSON, REGEXES
from transformers import AutoModelForCausalLM, AutoTokenizer

from proto import generation_pb2 as pb

pytestmark = pytest.mark.slow
T = 120
D = pb.DecodingParameters


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    # a grace period no busy machine runs out of: the SIGTERM test measures the exit from the stream's end
    with running_server(smollm2_dir, tmp_path_factory.mktemp("smollm2"), "--dtype", "float32",
                        "--max-sequence-length", "200", "--max-new-tokens", "169",
                        "--shutdown-grace-period", "600") as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield server.stub(channel)


def test_model_info(stub):
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=T)
    assert (info.model_kind, info.max_sequence_length, info.max_new_tokens) == (
        pb.ModelInfoResponse.DECODER_ONLY, 200, 169)


def test_greedy_matches_transformers(stub, smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    resp = stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=p) for p in prompts],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=24))), timeout=T)
    for prompt, r in zip(prompts, resp.responses, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        assert r.text == tok.decode(out, skip_special_tokens=True)
        assert r.generated_token_count == len(out) and r.input_token_count == ids.shape[1]
    assert "Paris" in resp.responses[0].text


def test_token_limit_when_output_does_not_fit(stub):
    text = "one two three four five six seven eight nine ten " * 40
    [r] = stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)], params=pb.Parameters(
        truncate_input_tokens=186, stopping=pb.StoppingCriteria(max_new_tokens=100, min_new_tokens=14))),
        timeout=T).responses
    assert (r.input_token_count, r.generated_token_count, r.stop_reason) == (186, 14, pb.TOKEN_LIMIT)


def test_readme_python_client_works(server):
    readme = (REPO / "README.md").read_text()
    block = readme.split("From Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "localhost:8033" in block
    out = subprocess.run([sys.executable, "-c", block.replace("localhost:8033", server.target)], cwd=REPO,
                         capture_output=True, text=True, timeout=T)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_readme_openai_client_works(server, smollm2_dir):
    readme = (REPO / "README.md").read_text()
    block = readme.split("### OpenAI API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "localhost:3000" in block and 'model="SmolLM2-135M-Instruct"' in block
    block = block.replace("localhost:3000", f"127.0.0.1:{server.http_port}").replace(
        'model="SmolLM2-135M-Instruct"', f"model={str(smollm2_dir)!r}")  # served under the path it was given
    out = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=T)
    assert out.returncode == 0, out.stderr
    chat, completion = out.stdout.split("\n", 1)
    assert "Paris" in chat and "Paris" in completion


@pytest.fixture(scope="module")
def chat(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return lambda text: tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)


def _guided_params(decoding: pb.DecodingParameters, **sampling) -> pb.Parameters:
    method = pb.SAMPLE if sampling else pb.GREEDY
    return pb.Parameters(method=method, decoding=decoding, stopping=pb.StoppingCriteria(max_new_tokens=100),
                         sampling=pb.SamplingParameters(**sampling))


def _guided_stream(stub, text: str, params: pb.Parameters) -> list[pb.GenerationResponse]:
    req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text), params=params)
    return list(stub.GenerateStream(req, timeout=T))


def test_guided_unary_json_schema_and_choice(stub, chat):
    [r] = stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=chat("Describe a fictional person as JSON."))],
        params=_guided_params(D(json_schema=json.dumps(PERSON)))), timeout=T).responses
    assert r.stop_reason == pb.EOS_TOKEN
    jsonschema.validate(json.loads(r.text), PERSON)
    choices = ["positive", "negative", "neutral"]
    [r] = stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=chat("Sentiment of 'what a lovely day'?"))],
        params=_guided_params(D(choice=D.StringChoices(choices=choices)), seed=42, temperature=0.8)),
        timeout=T).responses
    assert r.text in choices and r.seed == 42 and r.stop_reason == pb.EOS_TOKEN


def test_guided_stream_regex_grammar_and_format(stub, chat):
    date_prompt, regex = REGEXES[0]
    for prompt, decoding, check in [
            (date_prompt, D(regex=regex), lambda text: re.fullmatch(regex, text)),
            ("Return a JSON object with a name and an age.", D(format=D.JSON),
             lambda text: isinstance(json.loads(text), dict)),
            ("Yes or no?", D(grammar='root ::= "yes" | "no"'), lambda text: text in ("yes", "no"))]:
        msgs = _guided_stream(stub, chat(prompt), _guided_params(decoding))
        text = "".join(m.text for m in msgs)
        assert msgs[-1].stop_reason == pb.EOS_TOKEN and check(text), (decoding, text)
    # format TEXT constrains nothing: the same text as no guided option at all
    plain = "".join(m.text for m in _guided_stream(stub, chat("Hi!"), _guided_params(D())))
    assert "".join(m.text for m in _guided_stream(stub, chat("Hi!"), _guided_params(D(format=D.TEXT)))) == plain


BAD_SPECS = [
    (D(json_schema='{"type": "foo"}'), 'invalid guided decoding json_schema: Unsupported type "foo"'),
    (D(json_schema="{not json"), "guided decoding json_schema is not valid JSON: Expecting property name enclosed "
                                 "in double quotes: line 1 column 2 (char 1)"),
    (D(regex="[a-"), "invalid guided decoding regex: Regex parsing error at position 4: Unclosed '['"),
    (D(choice=D.StringChoices()), "Must provide at least two choices"),
    (D(choice=D.StringChoices(choices=["one"])), "Must provide at least two choices"),
    (D(grammar='root ::= "a" |'), "invalid guided decoding grammar: EBNF parser error at line 1, column 15: Expect "
                                  "element, but got"),
    (D(grammar="start: foo"), "invalid guided decoding grammar: Lark error at line 1, column 8: unknown name 'foo'\n"
                              "start: foo\n       ^"),
]


def test_guided_bad_specs_are_invalid_argument_unary_and_stream(stub, server):
    before = server.metrics().get('tgi_request_failure{err="validation"}', 0.0)
    for decoding, message in BAD_SPECS:
        params = _guided_params(decoding)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="hi")], params=params),
                          timeout=T)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        with pytest.raises(grpc.RpcError) as err:
            _guided_stream(stub, "hi", params)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    after = server.metrics()['tgi_request_failure{err="validation"}']
    assert after - before == 2 * len(BAD_SPECS)


def test_sigterm_lets_the_running_stream_finish_then_exits_0(server, stub):
    req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text="Tell me a long story."), params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=50, min_new_tokens=50)))
    call = stub.GenerateStream(req, timeout=5 * T)  # 50 tokens on a loaded 2-core machine can take minutes
    msgs = [next(call), next(call)]
    server.signal(signal.SIGTERM)
    msgs += list(call)
    assert (msgs[-1].stop_reason, msgs[-1].generated_token_count) == (pb.MAX_TOKENS, 50)
    assert server.wait(timeout=30) == 0  # it leaves once nothing is in flight, long before the grace period ends
    assert "Shutdown complete" in server.logs()

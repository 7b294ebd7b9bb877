"""Guided decoding through the real `tgis serve` (engine in its own process) with SmolLM2: each option of the
proto's `oneof guided`, unary and streaming, and bad specs answered INVALID_ARGUMENT before anything is queued."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest
from server_harness import running_server
from test_guided import PERSON, REGEXES
from transformers import AutoTokenizer

from proto import generation_pb2 as pb

pytestmark = pytest.mark.slow
T = 120
D = pb.DecodingParameters


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    with running_server(smollm2_dir, tmp_path_factory.mktemp("guided"), "--dtype", "float32",
                        "--max-sequence-length", "300", "--max-new-tokens", "100") as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield server.stub(channel)


@pytest.fixture(scope="module")
def chat(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return lambda text: tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)


def _params(decoding: pb.DecodingParameters, **sampling) -> pb.Parameters:
    method = pb.SAMPLE if sampling else pb.GREEDY
    return pb.Parameters(method=method, decoding=decoding, stopping=pb.StoppingCriteria(max_new_tokens=100),
                         sampling=pb.SamplingParameters(**sampling))


def _stream(stub, text: str, params: pb.Parameters) -> list[pb.GenerationResponse]:
    req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text), params=params)
    return list(stub.GenerateStream(req, timeout=T))


def test_unary_json_schema_and_choice(stub, chat):
    [r] = stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=chat("Describe a fictional person as JSON."))],
        params=_params(D(json_schema=json.dumps(PERSON)))), timeout=T).responses
    assert r.stop_reason == pb.EOS_TOKEN
    jsonschema.validate(json.loads(r.text), PERSON)
    choices = ["positive", "negative", "neutral"]
    [r] = stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=chat("Sentiment of 'what a lovely day'?"))],
        params=_params(D(choice=D.StringChoices(choices=choices)), seed=42, temperature=0.8)), timeout=T).responses
    assert r.text in choices and r.seed == 42 and r.stop_reason == pb.EOS_TOKEN


def test_stream_regex_grammar_and_format(stub, chat):
    date_prompt, regex = REGEXES[0]
    for prompt, decoding, check in [
            (date_prompt, D(regex=regex), lambda text: re.fullmatch(regex, text)),
            ("Return a JSON object with a name and an age.", D(format=D.JSON),
             lambda text: isinstance(json.loads(text), dict)),
            ("Yes or no?", D(grammar='root ::= "yes" | "no"'), lambda text: text in ("yes", "no"))]:
        msgs = _stream(stub, chat(prompt), _params(decoding))
        text = "".join(m.text for m in msgs)
        assert msgs[-1].stop_reason == pb.EOS_TOKEN and check(text), (decoding, text)
    # format TEXT constrains nothing: the same text as no guided option at all
    plain = "".join(m.text for m in _stream(stub, chat("Hi!"), _params(D())))
    assert "".join(m.text for m in _stream(stub, chat("Hi!"), _params(D(format=D.TEXT)))) == plain


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


def test_bad_specs_are_invalid_argument_unary_and_stream(stub, server):
    before = server.metrics().get('tgi_request_failure{err="validation"}', 0.0)
    for decoding, message in BAD_SPECS:
        params = _params(decoding)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="hi")], params=params),
                          timeout=T)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        with pytest.raises(grpc.RpcError) as err:
            _stream(stub, "hi", params)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    after = server.metrics()['tgi_request_failure{err="validation"}']
    assert after - before == 2 * len(BAD_SPECS)

"""TGIS parameter conversion (§1.4), validation order and messages (§1.5), clamping (§1.6), seeds (§1.7), the
server option table and the metrics exposition — without a server."""

from __future__ import annotations

import random

import pytest

from proto import generation_pb2 as pb
from runtime.config import ConfigError, ServerConfig, parse_bool
from runtime.server.metrics import METRICS, Metrics, buckets
from runtime.server.validation import (
    STOP_SEQUENCES_MESSAGE,
    ValidationError,
    check_length,
    convert_params,
    validate_params,
    with_seed,
)


def params(**kw) -> pb.Parameters:
    return pb.Parameters(**kw)


def convert(p: pb.Parameters | None, default_include: bool = True, now: float = 100.0):
    return convert_params(p, default_include, now)


def test_absent_params_are_greedy_20_without_stop_inclusion():
    gp = convert(None)
    assert (gp.temperature, gp.max_new_tokens, gp.include_stop_sequence, gp.deadline) == (0.0, 20, False, None)


def test_greedy_ignores_sampling_and_seed():
    gp = convert(params(sampling=pb.SamplingParameters(temperature=0.5, top_k=3, seed=7)))
    assert (gp.temperature, gp.top_k, gp.seed, gp.sampling) == (0.0, 0, None, False)


def test_sample_defaults_and_copies():
    gp = convert(params(method=pb.SAMPLE))
    assert (gp.temperature, gp.top_k, gp.top_p, gp.typical_p) == (1.0, 0, 1.0, 1.0)
    gp = convert(params(method=pb.SAMPLE, sampling=pb.SamplingParameters(top_k=5, top_p=0.5, typical_p=0.25, seed=9)))
    assert (gp.temperature, gp.top_k, gp.top_p, gp.typical_p, gp.seed) == (1.0, 5, 0.5, 0.25, 9)
    # proto3 cannot tell a TGIS client's 0.0 from unset: 1.0; the superset's explicit optional 0.0 is greedy
    explicit = pb.SamplingParameters()
    explicit.temperature = 0.0
    assert convert(params(method=pb.SAMPLE, sampling=explicit)).temperature == 0.0
    assert convert(params(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.7))).temperature == \
        pytest.approx(0.7)


def test_stopping_decoding_response_and_deadline():
    p = params(stopping=pb.StoppingCriteria(max_new_tokens=7, min_new_tokens=2, time_limit_millis=250,
                                            stop_sequences=["a", "b"]),
               decoding=pb.DecodingParameters(repetition_penalty=1.5,
                                              length_penalty=pb.DecodingParameters.LengthPenalty(start_index=3)),
               response=pb.ResponseOptions(generated_tokens=True, token_logprobs=True, top_n_tokens=2))
    gp = convert(p, default_include=True, now=10.0)
    assert (gp.max_new_tokens, gp.min_new_tokens, gp.stop_sequences) == (7, 2, ["a", "b"])
    assert gp.deadline == pytest.approx(10.25)
    assert gp.repetition_penalty == 1.5 and gp.length_penalty == (3, 0.0)
    assert (gp.generated_tokens, gp.token_logprobs, gp.top_n_tokens, gp.input_tokens) == (True, True, 2, False)
    assert gp.include_stop_sequence is True
    assert convert(p, default_include=False).include_stop_sequence is False
    p.stopping.include_stop_sequence = True
    assert convert(p, default_include=False).include_stop_sequence is True
    assert convert(params()).repetition_penalty == 1.0 and convert(params()).max_new_tokens == 20


def _sampling(**kw) -> pb.Parameters:
    return params(method=pb.SAMPLE, sampling=pb.SamplingParameters(**kw))


CASES = [
    (_sampling(temperature=0.01), "temperature must be >= 0.05"),
    (_sampling(temperature=-1.0), "temperature must be >= 0.05"),
    (_sampling(top_p=-0.5), "top_p must be > 0.0 and <= 1.0"),
    (_sampling(top_p=1.5), "top_p must be > 0.0 and <= 1.0"),
    (_sampling(typical_p=1.5), "typical_p must be <= 1.0"),
    (_sampling(top_k=2**31), "top_k must be strictly positive"),
    (params(stopping=pb.StoppingCriteria(max_new_tokens=170)), "max_new_tokens must be <= 169"),
    (params(stopping=pb.StoppingCriteria(min_new_tokens=21)), "min_new_tokens must be <= max_new_tokens"),
    (params(decoding=pb.DecodingParameters(repetition_penalty=-1.0)), "repetition_penalty must be > 0.0"),
    (params(decoding=pb.DecodingParameters(length_penalty=pb.DecodingParameters.LengthPenalty(decay_factor=0.5))),
     "length_penalty must be >= 1.0 and <= 10.0"),
    (params(decoding=pb.DecodingParameters(length_penalty=pb.DecodingParameters.LengthPenalty(decay_factor=10.5))),
     "length_penalty must be >= 1.0 and <= 10.0"),
    (params(stopping=pb.StoppingCriteria(stop_sequences=list("abcdefg"))), STOP_SEQUENCES_MESSAGE),
    (params(response=pb.ResponseOptions(token_logprobs=True)),
     "must request input and/or generated tokens to request extra token detail"),
    (params(response=pb.ResponseOptions(top_n_tokens=1)),
     "must request input and/or generated tokens to request extra token detail"),
    (params(stopping=pb.StoppingCriteria(stop_sequences=["ok", ""])), STOP_SEQUENCES_MESSAGE),
    (params(stopping=pb.StoppingCriteria(stop_sequences=["é" * 121])), STOP_SEQUENCES_MESSAGE),
]


@pytest.mark.parametrize(("request_params", "message"), CASES)
def test_validation_messages(request_params, message):
    with pytest.raises(ValidationError) as err:
        validate_params(convert(request_params), server_max_new_tokens=169)
    assert str(err.value) == message


def test_validation_order_first_failure_wins():
    p = _sampling(temperature=0.01, top_p=2.0)
    p.stopping.max_new_tokens = 500
    with pytest.raises(ValidationError, match="^temperature must be >= 0.05$"):
        validate_params(convert(p), 169)
    p.sampling.temperature = 1.0
    with pytest.raises(ValidationError, match=r"^top_p must be > 0.0 and <= 1.0$"):
        validate_params(convert(p), 169)
    # 7 stop sequences with an empty one: the count check (#9) comes before token-detail (#10) and emptiness (#11)
    p = params(stopping=pb.StoppingCriteria(stop_sequences=["", *"abcdef"]),
               response=pb.ResponseOptions(token_ranks=True))
    with pytest.raises(ValidationError) as err:
        validate_params(convert(p), 169)
    assert str(err.value) == STOP_SEQUENCES_MESSAGE


def test_valid_edges_pass():
    for p in [_sampling(temperature=0.05, top_p=1.0, typical_p=-3.0), _sampling(top_k=2**31 - 1),
              params(stopping=pb.StoppingCriteria(max_new_tokens=169, min_new_tokens=169,
                                                  stop_sequences=["x" * 240] * 6)),
              params(decoding=pb.DecodingParameters(length_penalty=pb.DecodingParameters.LengthPenalty(
                  decay_factor=10.0))),
              params(response=pb.ResponseOptions(input_tokens=True, token_logprobs=True))]:
        validate_params(convert(p), 169)
    with pytest.raises(ValidationError, match="max_new_tokens must be <= 19"):
        validate_params(convert(None), 19)  # the default 20 is checked against the server limit too


def test_length_checks_and_clamp():
    gp = convert(params(stopping=pb.StoppingCriteria(max_new_tokens=100)))
    clamped = check_length(gp, 186, 200)
    assert (clamped.max_new_tokens, clamped.max_is_token_limit) == (14, True)
    assert gp.max_new_tokens == 100 and not gp.max_is_token_limit  # the shared RPC params are untouched
    assert check_length(gp, 100, 200) is gp
    with pytest.raises(ValidationError) as err:
        check_length(gp, 200, 200)
    assert str(err.value) == "input tokens (200) plus prefix length (0) must be < 200"
    gp = convert(params(stopping=pb.StoppingCriteria(max_new_tokens=10, min_new_tokens=3)))
    with pytest.raises(ValidationError) as err:
        check_length(gp, 198, 200)
    assert str(err.value) == "input tokens (198) plus prefix length (0) plus min_new_tokens (3) must be <= 200"
    gp = convert(params(stopping=pb.StoppingCriteria(max_new_tokens=10, min_new_tokens=2)))
    assert check_length(gp, 198, 200).max_new_tokens == 2


def test_seeds():
    rng = random.Random(0)
    sampled = convert(params(method=pb.SAMPLE))
    seeds = [with_seed(sampled, rng).seed for _ in range(5)]
    assert all(0 <= s <= 2**32 - 1 for s in seeds) and len(set(seeds)) == 5
    given = convert(_sampling(seed=2**40))
    assert with_seed(given, rng).seed == 2**40
    assert with_seed(convert(None), rng).seed is None


def test_config_validation_messages():
    ServerConfig().validate()
    cases = [
        (dict(max_concurrent_requests=0), "max_concurrent_requests must be > 0"),
        (dict(max_new_tokens=0), "max_new_tokens (0) at least 1"),
        (dict(max_sequence_length=1), "max_sequence_length (1) must be at least 2 (1 input + 1 output)"),
        (dict(cuda_process_memory_fraction=1.5), "cuda_process_memory_fraction must be in range 0 < x <= 1"),
        (dict(dtype="float16", dtype_str="bfloat16"), "dtype and dtype_str args both provided with different values"),
        (dict(dtype="int3"), "Unrecognized data type: int3"),
        (dict(num_gpus=2, num_shard=1), "NUM_GPUS and num_shard are set to different values (2 and 1)"),
        (dict(tls_cert_path="c.pem"), "tls: must provide both cert and key"),
        (dict(tls_client_ca_cert_path="ca.pem"), "tls: cannot provide client ca cert without keypair"),
        (dict(port=70000), "port (70000) must be in 1..65535"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as err:
            ServerConfig(**kwargs).validate()
        assert str(err.value) == message
    assert parse_bool("FALSE") is False and parse_bool("1") is True
    with pytest.raises(ValueError):
        parse_bool("maybe")


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_exposition():
    m = Metrics(max_sequence_length=200, max_new_tokens=169, max_batch_size=8)
    # no TGIS metric appears before it is recorded; our own prefix-cache counters start at 0 (a baseline for scrapers)
    assert _samples(m.render().decode()) == {f"tgis_prefix_cache_{n}{t}": 0.0 for n in ("queries", "hits")
                                             for t in ("", "_total")}
    m.inc("tgi_request_count", kind="single")
    m.inc("tgi_request_count", kind="single")
    m.inc("tgi_request_failure", 3, err="cancelled")
    m.observe("tgi_request_input_length", 7)
    m.observe("tgi_batch_next_tokens", 12)
    m.set("tgi_queue_size", 4)
    text = m.render().decode()
    s = _samples(text)
    assert s['tgi_request_count{kind="single"}'] == s['tgi_request_count_total{kind="single"}'] == 2
    assert s['tgi_request_failure{err="cancelled"}'] == s['tgi_request_failure_total{err="cancelled"}'] == 3
    assert s['tgi_request_input_length_bucket{le="6.25"}'] == 0
    assert s['tgi_request_input_length_bucket{le="9.375"}'] == 1
    assert s["tgi_request_input_length_count"] == 1 and s["tgi_request_input_length_sum"] == 7
    assert s["tgi_batch_next_tokens_count"] == 1 and "# TYPE tgi_batch_next_tokens summary" in text
    assert s["tgi_queue_size"] == 4
    assert not any(k.endswith("_created") or "_created{" in k for k in s)
    layouts = buckets(200, 169, 8)
    assert len(layouts["duration"]) == 35 and layouts["duration"][0] == pytest.approx(0.00015)
    assert layouts["duration"][-1] == pytest.approx(0.0001 * 1.5**35)
    assert layouts["tokenize"][0] == 64 and layouts["tokenize"][-1] == 2**19
    assert layouts["batch_size"] == [1, 2, 3, 4, 5, 6, 7, 8] and layouts["new_tokens"][-1] == 169
    tgis_own = {"tgis_prefix_cache_queries", "tgis_prefix_cache_hits"}  # ours, beside TGIS' 37
    assert all(name.startswith("tgi_") for name in METRICS.keys() - tgis_own) and len(METRICS) == 37 + len(tgis_own)

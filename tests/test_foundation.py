"""Foundation: CLI surface, proto wire compatibility and freshness, tiny model fixtures."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tgis_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["download-weights", "convert-to-safetensors", "serve", "shard", "tokenize", "generate", "bench"]


def test_help_lists_all_subcommands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name):
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("tgis ")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + payload


def _len_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def test_generation_response_decodes_spec_field_numbers():
    """Bytes built by hand from the spec's field numbers decode into the right fields."""
    from proto import generation_pb2 as pb

    raw = (
        _field(6, 0, _varint(17))                 # input_token_count
        + _field(2, 0, _varint(5))                # generated_token_count
        + _len_field(4, b"hello")                 # text
        + _field(7, 0, _varint(5))                # stop_reason = STOP_SEQUENCE
        + _len_field(11, b"END")                  # stop_sequence
        + _field(10, 0, _varint(2**40 + 3))       # seed (uint64)
        + _len_field(8, _len_field(2, b"\xc4\xa0hi") + _field(4, 0, _varint(3)))  # tokens[0]: text, rank
    )
    msg = pb.GenerationResponse.FromString(raw)
    assert msg.input_token_count == 17
    assert msg.generated_token_count == 5
    assert msg.text == "hello"
    assert msg.stop_reason == pb.STOP_SEQUENCE
    assert msg.stop_sequence == "END"
    assert msg.seed == 2**40 + 3
    assert msg.tokens[0].text == "Ġhi" and msg.tokens[0].rank == 3
    assert pb.GenerationResponse.FromString(msg.SerializeToString()) == msg


def test_request_field_numbers():
    from proto import generation_pb2 as pb

    fields = {f.name: f.number for f in pb.BatchedGenerationRequest.DESCRIPTOR.fields}
    assert fields == {"model_id": 1, "prefix_id": 2, "requests": 3, "adapter_id": 4, "params": 10}
    assert {f.name: f.number for f in pb.Parameters.DESCRIPTOR.fields} == {
        "method": 1, "sampling": 2, "stopping": 3, "response": 4, "decoding": 5, "truncate_input_tokens": 6}
    assert {f.name: f.number for f in pb.StoppingCriteria.DESCRIPTOR.fields} == {
        "max_new_tokens": 1, "min_new_tokens": 2, "time_limit_millis": 3, "stop_sequences": 4,
        "include_stop_sequence": 5}
    assert {f.name: f.number for f in pb.ResponseOptions.DESCRIPTOR.fields} == {
        "input_text": 1, "generated_tokens": 2, "input_tokens": 3, "token_logprobs": 4, "token_ranks": 5,
        "top_n_tokens": 6}
    assert {f.name: f.number for f in pb.DecodingParameters.DESCRIPTOR.fields} == {
        "repetition_penalty": 1, "length_penalty": 2, "format": 3, "json_schema": 4, "regex": 5, "choice": 6,
        "grammar": 7}
    assert {f.name: f.number for f in pb.TokenInfo.DESCRIPTOR.fields} == {
        "text": 2, "logprob": 3, "rank": 4, "top_tokens": 5}
    assert {f.name: f.number for f in pb.BatchedTokenizeRequest.DESCRIPTOR.fields} == {
        "model_id": 1, "requests": 2, "return_tokens": 3, "return_offsets": 4, "truncate_input_tokens": 5,
        "prefix_id": 6, "adapter_id": 7}
    assert pb.DESCRIPTOR.services_by_name["GenerationService"].full_name == "fmaas.GenerationService"
    assert pb.StopReason.Value("TOKEN_LIMIT") == 6 and pb.DecodingMethod.Value("SAMPLE") == 1


def test_generated_proto_modules_are_fresh(tmp_path):
    """`make proto` output must match what is committed."""
    (tmp_path / "proto").mkdir()
    (tmp_path / "proto" / "generation.proto").write_bytes((ROOT / "proto" / "generation.proto").read_bytes())
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.", "--pyi_out=.",
         "proto/generation.proto"],
        cwd=tmp_path, check=True,
    )
    for name in ["generation_pb2.py", "generation_pb2_grpc.py", "generation_pb2.pyi"]:
        assert filecmp.cmp(tmp_path / "proto" / name, ROOT / "proto" / name, shallow=False), f"{name} is stale"


def test_tiny_model_loads_generates_and_round_trips(any_tiny_model):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    name, path = any_tiny_model
    cfg = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    text = "The quick brown fox: def f(x): return x + 1"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == text
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new = out[0, (1 if cfg.is_encoder_decoder else ids.shape[1]):]
    assert new.shape[0] == 8
    assert torch.all(new < cfg.vocab_size)

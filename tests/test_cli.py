"""`tgis generate` and `tgis tokenize` end to end through the Typer app."""

from __future__ import annotations

import json

import pytest
from engine_utils import hf_greedy
from typer.testing import CliRunner

from tgis_cli.main import app

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_tokenize_json_byte_offsets_and_truncation(tiny_model):
    path = str(tiny_model("llama"))
    out = json.loads(_invoke("tokenize", path, "héllo wörld", "--json").stdout)
    assert out["tokens"][0] == "<s>" and out["offsets"][0] == [0, 0]
    assert out["token_count"] == len(out["tokens"])
    assert out["offsets"][-1][1] == len("héllo wörld".encode())
    trunc = json.loads(_invoke("tokenize", path, "héllo wörld", "--json", "--truncate-input-tokens", "2").stdout)
    assert trunc["token_count"] == 2 and trunc["tokens"] == out["tokens"][-2:]


def test_generate_json_batches_prompts_and_matches_transformers(tiny_model):
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.config import EngineConfig

    path = str(tiny_model("gpt2"))
    prompts = ["Hello world", "def f(x):", "The quick brown fox"]
    result = _invoke("generate", path, *prompts, "--json", "-n", "6", "--top-n-tokens", "2")
    objs = [json.loads(chunk) for chunk in _split_json(result.stdout)]
    assert [o["prompt"] for o in objs] == prompts
    engine = AsyncEngine(EngineConfig(model_path=path))
    try:
        for o in objs:
            ids = engine.tokenizer(o["prompt"])["input_ids"]
            ref = hf_greedy(engine, ids, 6)
            assert [t["text"] for t in o["tokens"]] == engine.tokenizer.convert_ids_to_tokens(ref)
            assert o["generated_token_count"] == len(ref)
            assert all(t["rank"] == 1 for t in o["tokens"])  # greedy picks the top token
            assert all(len(t["top_tokens"]) >= 2 for t in o["tokens"])
    finally:
        engine.shutdown()


def _split_json(text: str) -> list[str]:
    """Split concatenated pretty-printed JSON objects."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, j = dec.raw_decode(text, i)
        out.append(json.dumps(obj))
        i = j
    return out


@pytest.mark.slow
def test_generate_smollm2_paris(smollm2_dir):
    """An instruct model: prompts go through its chat template by default, --raw sends them as they are."""
    raw = _invoke("generate", str(smollm2_dir), "The capital of France is", "-n", "3", "--dtype", "float32", "--raw")
    assert raw.stdout.startswith(" Paris.")
    chat = _invoke("generate", str(smollm2_dir), "What is the capital of France?", "-n", "8", "--dtype", "float32")
    assert "Paris" in chat.stdout


def test_generate_guided_options(tiny_model, tmp_path):
    """A random tiny model still produces outputs its grammar accepts; bad or conflicting options exit 2."""
    path = str(tiny_model("gpt2"))
    out = json.loads(_invoke("generate", path, "Pick:", "--json", "-n", "12", "--choice", "red,green,blue").stdout)
    assert out["text"] in ("red", "green", "blue") and out["stop_reason"] == "EOS_TOKEN"
    (tmp_path / "schema.json").write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, '
                                          '"required": ["ok"], "additionalProperties": false}')
    out = json.loads(_invoke("generate", path, "JSON:", "--json", "-n", "12", "--json-schema",
                             str(tmp_path / "schema.json")).stdout)
    assert json.loads(out["text"]) in ({"ok": True}, {"ok": False})
    (tmp_path / "yes.lark").write_text('start: "yes" | "no"')
    out = json.loads(_invoke("generate", path, "Q:", "--json", "-n", "12", "--grammar", str(tmp_path / "yes.lark"))
                     .stdout)
    assert out["text"] in ("yes", "no")
    for args, message in [(["--choice", "only"], "Must provide at least two choices"),
                          (["--regex", "("], "invalid guided decoding regex"),
                          (["--regex", "a", "--choice", "a,b"], "give at most one of")]:
        result = runner.invoke(app, ["generate", path, "x", *args])
        assert result.exit_code == 2 and message in result.output, result.output

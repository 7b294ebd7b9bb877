"""`tgis convert-to-safetensors`: .bin (tied, sharded) and GGUF inputs, verified by exact logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from tgis_cli.main import app

IDS = torch.tensor([[5, 9, 200, 31, 7]])


def _convert(path) -> object:
    return CliRunner().invoke(app, ["convert-to-safetensors", str(path)])


def _bin_copy(src, dst, state_files: dict[str, dict]) -> None:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copy(p, dst / p.name)
    for name, state in state_files.items():
        torch.save(state, dst / name)


def test_tied_gpt2_bin_round_trip(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("gpt2"))
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()  # really tied
    out = tmp_path / "gpt2-bin"
    _bin_copy(tiny_model("gpt2"), out, {"pytorch_model.bin": state})
    result = _convert(out)
    assert result.exit_code == 0, result.output
    with safe_open(out / "model.safetensors", "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert meta["format"] == "pt" and meta["lm_head.weight"] == "transformer.wte.weight"
    converted = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert torch.equal(converted(IDS).logits, model(IDS).logits)
    again = _convert(out)
    assert again.exit_code == 1 and "Existing .safetensors weights found" in again.output


def test_sharded_bin_with_index(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    state = model.state_dict()
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    files = {f"pytorch_model-0000{i + 1}-of-00002.bin": {n: state[n].clone() for n in half}
             for i, half in enumerate(halves)}
    out = tmp_path / "llama-sharded"
    _bin_copy(tiny_model("llama"), out, files)
    weight_map = {n: f for f, part in files.items() for n in part}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    result = _convert(out)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    converted = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert torch.equal(converted(IDS).logits, model(IDS).logits)


def test_no_bin_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = _convert(tmp_path)
    assert result.exit_code == 1 and "No pytorch .bin files found to convert" in result.output


@pytest.mark.slow
def test_smollm2_gguf_converts_and_says_paris(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runtime.default_model import fetch_gguf, tgis_cache_dir

    gguf = fetch_gguf(tgis_cache_dir() / "downloads")
    (tmp_path / gguf.name).symlink_to(gguf)
    result = _convert(tmp_path)
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in tmp_path.iterdir()}
    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]) == " Paris."
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

"""`tgis shard`: per-rank files that reassemble bit-exactly, GQA-aware rules, clear divisibility errors."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tgis_cli.main import app


def _shard(model, n, out):
    return CliRunner().invoke(app, ["shard", str(model), "--num-shards", str(n), "--output", str(out)])


def _text(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_llama_two_ranks_reassemble_bit_exactly(tiny_model, tmp_path):
    src = tiny_model("llama")
    result = _shard(src, 2, tmp_path / "tp2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "tp2" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and "model.safetensors" in manifest["source_files"]
    rules = manifest["rules"]
    layer = "model.layers.0"
    assert rules[f"{layer}.self_attn.q_proj.weight"] == {"split": "column", "dim": 0}
    assert rules[f"{layer}.self_attn.o_proj.weight"] == {"split": "row", "dim": 1}
    assert rules[f"{layer}.mlp.down_proj.weight"] == {"split": "row", "dim": 1}
    assert rules["model.embed_tokens.weight"] == {"split": "vocab", "dim": 0}
    assert rules[f"{layer}.input_layernorm.weight"] == {"split": "replicate", "dim": None}
    original = load_file(src / "model.safetensors")
    ranks = [load_file(tmp_path / "tp2" / f"rank-{r}" / "model.safetensors") for r in range(2)]
    # 4 heads / 2 KV heads of 16 dims: each rank holds 2 query heads and 1 whole KV head
    assert ranks[0][f"{layer}.self_attn.q_proj.weight"].shape == (32, 64)
    assert ranks[1][f"{layer}.self_attn.k_proj.weight"].shape == (16, 64)
    assert ranks[0][f"{layer}.mlp.gate_proj.weight"].shape == (64, 64)
    assert ranks[0][f"{layer}.mlp.down_proj.weight"].shape == (64, 64)
    for name, tensor in original.items():
        dim = rules[name]["dim"]
        rebuilt = ranks[0][name] if dim is None else torch.cat([r[name] for r in ranks], dim=dim)
        assert torch.equal(rebuilt, tensor), name
    assert (tmp_path / "tp2" / "rank-1" / "config.json").exists()
    assert (tmp_path / "tp2" / "rank-1" / "tokenizer.json").exists()
    assert (tmp_path / "tp2" / "config.json").exists() and (tmp_path / "tp2" / "tokenizer.json").exists()
    again = _shard(src, 2, tmp_path / "tp2")
    assert again.exit_code == 1 and "is not empty: remove it first" in _text(again)


def test_indivisible_and_unsupported(tiny_model, tmp_path):
    bad = _shard(tiny_model("llama"), 3, tmp_path / "tp3")
    assert bad.exit_code == 1 and "num_attention_heads (4) is not divisible by --num-shards 3" in _text(bad)
    kv = _shard(tiny_model("llama"), 4, tmp_path / "tp4")
    assert kv.exit_code == 1 and "num_key_value_heads (2) is not divisible by --num-shards 4" in _text(kv)
    gpt2 = _shard(tiny_model("gpt2"), 2, tmp_path / "gpt2")
    assert gpt2.exit_code == 1 and "not 'gpt2'" in _text(gpt2)

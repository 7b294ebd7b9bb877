"""`tgis download-weights` against a loopback fake of the Hub API, and offline resolution of what it cached."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub

TGIS = [sys.executable, "-m", "tgis_cli"]
TIMEOUT = 120


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*TGIS, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.fixture
def hub(tmp_path):
    with FakeHub() as h:
        env = {**os.environ, "HF_ENDPOINT": h.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0",
               "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "10"}
        for var in ("HF_TOKEN", "TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE"):
            env.pop(var, None)
        h.env = env
        h.cache = tmp_path / "cache"
        yield h


def _repo_files(model_dir: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    files["training_args.bin"] = b"never downloaded"
    files["README.md"] = b"# tiny"
    files["onnx/model.onnx"] = b"not top-level"
    return files


def test_download_fills_cache_then_noop_then_resolves_offline(hub, tiny_model):
    repo = hub.add_repo("org/tiny-llama", _repo_files(tiny_model("llama")))
    first = _cli(["download-weights", "org/tiny-llama"], hub.env)
    assert first.returncode == 0, first.stderr
    folder = hub.cache / "models--org--tiny-llama"
    assert (folder / "refs" / "main").read_text() == repo.sha
    snap = folder / "snapshots" / repo.sha
    names = sorted(p.name for p in snap.iterdir())
    assert names == ["README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    assert "HTTP Request" not in first.stderr  # httpx's per-request INFO lines stay quiet
    assert (snap / "model.safetensors").is_symlink() and any((folder / "blobs").iterdir())
    assert (snap / "model.safetensors").read_bytes() == (tiny_model("llama") / "model.safetensors").read_bytes()
    served = hub.downloads()
    assert len(served) == len(names)

    before = len(hub.requests)
    second = _cli(["download-weights", "org/tiny-llama"], hub.env)
    assert second.returncode == 0, second.stderr
    assert hub.downloads() == served  # nothing fetched again
    assert [p for _, p in hub.requests[before:] if "/resolve/" in p] == []  # not even a HEAD: the commit is pinned

    offline = {**hub.env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = _cli(["tokenize", "org/tiny-llama", "hello world", "--json"], offline)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"][0] == "<s>"

    from runtime.hub import ModelNotFoundError, resolve_model_path

    os.environ["HF_HUB_CACHE"], saved = str(hub.cache), os.environ.get("HF_HUB_CACHE")
    try:
        assert resolve_model_path("org/tiny-llama") == snap
        with pytest.raises(ModelNotFoundError, match="tgis download-weights org/other"):
            resolve_model_path("org/other")
    finally:
        os.environ.pop("HF_HUB_CACHE") if saved is None else os.environ.__setitem__("HF_HUB_CACHE", saved)


def test_model_name_from_the_environment(hub, tiny_model):
    """The Kubernetes init container runs a bare `tgis download-weights` with the server's MODEL_NAME."""
    repo = hub.add_repo("org/tiny-llama", _repo_files(tiny_model("llama")))
    result = _cli(["download-weights"], {**hub.env, "MODEL_NAME": "org/tiny-llama"})
    assert result.returncode == 0, result.stderr
    assert (hub.cache / "models--org--tiny-llama" / "snapshots" / repo.sha / "model.safetensors").is_file()


def test_no_model_prepares_the_built_in_one(hub, tiny_model, tmp_path):
    """No MODEL_NAME: the built-in model `tgis serve` would serve, from TGIS_CACHE (already prepared here, so the
    package index is not asked), and nothing from the hub."""
    from runtime.default_model import DEFAULT_MODEL_NAME

    prepared = tmp_path / "tgis" / "models" / DEFAULT_MODEL_NAME
    prepared.parent.mkdir(parents=True)
    prepared.symlink_to(tiny_model("llama"), target_is_directory=True)
    env = {k: v for k, v in hub.env.items() if k != "MODEL_NAME"}
    result = _cli(["download-weights"], {**env, "TGIS_CACHE": str(tmp_path / "tgis")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{DEFAULT_MODEL_NAME} is in {prepared}"
    assert hub.requests == []


def test_extension_filter(hub, tiny_model):
    hub.add_repo("org/tiny-llama", _repo_files(tiny_model("llama")))
    result = _cli(["download-weights", "org/tiny-llama", "--extension", ".json"], hub.env)
    assert result.returncode == 0, result.stderr
    snap = next((hub.cache / "models--org--tiny-llama" / "snapshots").iterdir())
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "generation_config.json", "tokenizer.json",
                                                     "tokenizer_config.json"]


def test_bin_only_repo_is_downloaded_and_converted(hub, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("gpt2")
    model = AutoModelForCausalLM.from_pretrained(src)
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file() and p.suffix != ".safetensors"}
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    files["pytorch_model.bin"] = (tmp_path / "pytorch_model.bin").read_bytes()
    hub.add_repo("org/bin-only", files)
    result = _cli(["download-weights", "org/bin-only"], hub.env)
    assert result.returncode == 0, result.stderr
    assert ".safetensors weights not found, downloading pytorch weights to convert..." in result.stdout
    assert ".safetensors weights not found, converting from pytorch weights..." in result.stdout
    snap = next((hub.cache / "models--org--bin-only" / "snapshots").iterdir())
    converted = AutoModelForCausalLM.from_pretrained(snap, use_safetensors=True)
    ids = torch.tensor([[5, 9, 200, 31]])
    assert torch.equal(converted(ids).logits, model(ids).logits)

    served = hub.downloads()
    again = _cli(["download-weights", "org/bin-only"], hub.env)
    assert again.returncode == 0, again.stderr
    assert "were found locally. Remove them first to re-convert" in again.stdout
    assert hub.downloads() == served


def test_dropped_connection_resumes_with_range(hub):
    # huggingface_hub streams in 10 MB chunks: the file must be larger for a partial chunk to reach the disk
    weights = os.urandom(24 << 20)
    repo = hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": weights})
    hub.truncate_once.add("model.safetensors")
    result = _cli(["download-weights", "org/big"], hub.env)
    assert result.returncode == 0, result.stderr
    [(path, start)] = hub.ranges
    assert path == f"/org/big/resolve/{repo.sha}/model.safetensors" and 0 < start <= len(weights) // 2
    snap = hub.cache / "models--org--big" / "snapshots" / repo.sha
    assert (snap / "model.safetensors").read_bytes() == weights


def test_clear_errors(hub, tiny_model):
    hub.add_repo("org/gated", _repo_files(tiny_model("llama")), gated=True)
    missing = _cli(["download-weights", "org/nope"], hub.env)
    assert missing.returncode == 1 and "not found on the hub" in missing.stderr
    gated = _cli(["download-weights", "org/gated"], hub.env)
    assert gated.returncode == 1 and "gated" in gated.stderr
    ok = _cli(["download-weights", "org/gated", "--token", hub.token], hub.env)
    assert ok.returncode == 0, ok.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    offline = _cli(["download-weights", "org/tiny"], {**hub.env, "HF_ENDPOINT": closed})
    assert offline.returncode == 1 and "Cannot reach the hub" in offline.stderr


def _cached(cache: Path, model: str, commit: str, files: list[str]) -> Path:
    snap = cache / ("models--" + model.replace("/", "--")) / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in files:
        (snap / name).write_text("{}")
    return snap


def test_resolution_follows_refs_offline(monkeypatch, tmp_path):
    from runtime.hub import ModelNotFoundError, resolve_model_path

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for var in ("TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    main, v1 = "a" * 40, "b" * 40
    snap_main = _cached(tmp_path / "cache", "org/m", main, ["config.json", "model.safetensors"])
    snap_v1 = _cached(tmp_path / "cache", "org/m", v1, ["config.json", "pytorch_model.bin"])
    refs = tmp_path / "cache" / "models--org--m" / "refs"
    refs.mkdir()
    (refs / "main").write_text(main + "\n")
    (refs / "v1").write_text(v1)
    assert resolve_model_path("org/m") == snap_main
    assert resolve_model_path("org/m", "v1") == snap_v1
    assert resolve_model_path("org/m", v1) == snap_v1  # no ref file: the revision names the snapshot
    with pytest.raises(ModelNotFoundError, match="revision v2 .*tgis download-weights org/m --revision v2"):
        resolve_model_path("org/m", "v2")
    _cached(tmp_path / "cache", "org/nocfg", main, ["model.safetensors"])
    with pytest.raises(ModelNotFoundError, match="Config file not found in local cache for model org/nocfg"):
        resolve_model_path("org/nocfg", main)
    _cached(tmp_path / "cache", "org/noweights", main, ["config.json"])
    with pytest.raises(ModelNotFoundError, match="No weights .* org/noweights"):
        resolve_model_path("org/noweights", main)
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert resolve_model_path(str(local)) == local  # a model directory is used as is


def test_disk_space_is_checked_before_downloading(monkeypatch, tmp_path):
    import shutil

    from runtime.hub import HubError, check_free_space

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1_000_000))
    check_free_space(999_999, tmp_path / "cache" / "not-yet-created")
    with pytest.raises(HubError, match=r"Not enough disk space .* 2\.0 MB, 1\.0 MB are free"):
        check_free_space(2_000_000, tmp_path / "cache")


def test_cache_dir_resolution(monkeypatch, tmp_path):
    from runtime.hub import hub_cache_dir

    for var in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("TRANSFORMERS_CACHE", str(tmp_path / "tc"))
    assert hub_cache_dir() == tmp_path / "tc"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "tc"))
    assert hub_cache_dir() == tmp_path / "tc"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "other"))
    with pytest.raises(ValueError, match="env vars can't be set to different values"):
        hub_cache_dir()


def test_slow_tokenizer_repo_gets_a_fast_tokenizer(hub, tiny_model):
    """TGIS' download step 4: a repo with only vocab.json + merges.txt ends up with a tokenizer.json that encodes
    exactly like the original."""
    from transformers import AutoTokenizer

    src = tiny_model("gpt2")
    model_json = json.loads((src / "tokenizer.json").read_text())["model"]
    merges = "\n".join(m if isinstance(m, str) else " ".join(m) for m in model_json["merges"])
    files = {"model.safetensors": (src / "model.safetensors").read_bytes(),
             "config.json": (src / "config.json").read_bytes(),
             "vocab.json": json.dumps(model_json["vocab"]).encode(),
             "merges.txt": f"#version: 0.2\n{merges}\n".encode(),
             "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
                                                  "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}).encode()}
    hub.add_repo("org/slow-tok", files)
    result = _cli(["download-weights", "org/slow-tok", "--extension", ".safetensors,.json,.txt"], hub.env)
    assert result.returncode == 0, result.stderr
    snap = next((hub.cache / "models--org--slow-tok" / "snapshots").iterdir())
    assert f"wrote fast tokenizer {snap / 'tokenizer.json'}" in " ".join(result.stdout.split())
    text = "def f(x):\n    return x  # café"
    fast = AutoTokenizer.from_pretrained(snap)
    assert fast(text)["input_ids"] == AutoTokenizer.from_pretrained(src)(text)["input_ids"]
    again = _cli(["download-weights", "org/slow-tok", "--extension", ".safetensors,.json,.txt"], hub.env)
    assert "Model org/slow-tok already has a fast tokenizer" in again.stdout

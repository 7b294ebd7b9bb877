"""Every CLI mistake ends as one red line that says what to do, with exit code 2 (usage) or 1 (run time), before
any model loads; the traceback only at debug log level. Also: help is fast (no torch) and accepts -h, `serve --help`
is grouped into panels, flags show no type."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys

import pytest
from server_harness import REPO, free_port, run_to_exit
from typer.testing import CliRunner

from tgis_cli.main import app

runner = CliRunner()


def one_line_error(args: list[str], code: int, *, env: dict[str, str] | None = None) -> str:
    """Run `tgis ARGS` in-process; assert the exit code and that stderr is exactly one `Error: ...` line."""
    result = runner.invoke(app, args, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def llama(tiny_model) -> str:
    return str(tiny_model("llama"))


@pytest.fixture(scope="module")
def gpt2(tiny_model) -> str:
    return str(tiny_model("gpt2"))


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--log-level", "bogus", "tokenize", "x"], 2, "'bogus' is not a log level: use one of debug, info"),
    (["generate", "MODEL", "hi", "--dtype", "float8"], 2, "'float8' is not a dtype: use one of float32"),
    (["generate", "MODEL", "hi", "--num-gpus", "5"], 2,
     "cannot be split into 5 tensor-parallel ranks: num_attention_heads (4) is smaller than the number of shards "
     "(5); choose another --num-gpus"),
    (["generate", "./no-such-model", "prompt"], 1, "Model ./no-such-model not found"),
    (["tokenize", "./no-such-model", "text"], 1, "Model ./no-such-model not found"),
    (["generate", "MODEL", "hi", "--temperature", "0.01"], 2, "--temperature must be 0 (greedy) or >= 0.05"),
    (["generate", "--max-new-tokens", "abc", "hi"], 2, "Invalid value for '--max-new-tokens'"),
    (["generate", "MODEL", "one", "--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e",
      "--stop", "f", "--stop", "g"], 2, "can specify at most 6 stop sequences"),
    (["no-such-command"], 2, "No such command 'no-such-command'"),
])
def test_mistakes_are_one_line_with_the_exit_code(llama, args, code, says):
    line = one_line_error([llama if a == "MODEL" else a for a in args], code)
    assert says in line


def test_device_without_cuda(llama):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = one_line_error(["generate", llama, "hi", "--device", "cuda"], 2)
    assert "CUDA is not available" in line and "use --device cpu" in line


def test_chat_template_needs_one_and_empty_prompts_are_explained(gpt2):
    assert "this model has no chat template: drop --chat" in one_line_error(["generate", gpt2, "hi", "--chat"], 2)
    assert "the prompt produced no tokens" in one_line_error(["generate", gpt2, ""], 2)


def test_bench_without_a_server(gpt2):
    """bench reports this one itself (commands/bench.py), also as one line."""
    result = runner.invoke(app, ["bench", gpt2, "--grpc", f"127.0.0.1:{free_port()}", "-n", "1", "-c", "1"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "no TGIS server answering" in lines[0], result.output


def test_traceback_only_at_debug_level(monkeypatch):
    """An unexpected failure is one line and a hint; with --log-level debug the traceback comes too."""
    from commands import tokenize

    def broken(*_args, **_kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(tokenize, "resolve_model", broken)
    line = one_line_error(["tokenize", "text"], 1)
    assert line == "Error: KeyError: 'boom' (rerun with `tgis --log-level debug ...` for the traceback)"
    root = logging.getLogger()
    level = root.level
    try:
        result = runner.invoke(app, ["--log-level", "debug", "tokenize", "text"])
    finally:
        root.setLevel(level)
    assert result.exit_code == 1 and "Traceback" in result.stderr and "KeyError: 'boom'" in result.stderr


def _recorded(monkeypatch, what) -> list:
    """`what(request)` for every engine request `tgis generate` runs (it still runs them)."""
    from commands import generate as command

    seen, real = [], command._run

    async def run(engine, requests, stream_to_console):
        seen.extend(what(r) for r in requests)
        return await real(engine, requests, stream_to_console)

    monkeypatch.setattr(command, "_run", run)
    return seen


def test_generate_applies_the_chat_template_unless_raw(llama, monkeypatch):
    """The tiny Llama has a chat template: the prompt the model sees is wrapped in it by default, raw with --raw."""
    from transformers import AutoTokenizer

    seen = _recorded(monkeypatch, lambda r: r.input_ids)
    assert runner.invoke(app, ["generate", llama, "Hello", "-n", "2"]).exit_code == 0
    assert runner.invoke(app, ["generate", llama, "Hello", "-n", "2", "--raw"]).exit_code == 0
    tok = AutoTokenizer.from_pretrained(llama)
    templated = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                        tokenize=False)
    assert seen == [tok(templated)["input_ids"], tok("Hello")["input_ids"]]


def test_temperature_zero_is_greedy(llama, monkeypatch):
    seen = _recorded(monkeypatch, lambda r: (r.params.temperature, r.params.seed is not None))
    for extra in (["--temperature", "0", "--sample"], ["--temperature", "0.7"], []):
        assert runner.invoke(app, ["generate", llama, "Hi", "-n", "1", "--raw", *extra]).exit_code == 0
    assert seen == [(0.0, False), (0.7, True), (0.0, False)]


def test_busy_port_is_named_before_the_model_loads(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, output = run_to_exit(None, tmp_path, "--grpc-port", str(port), timeout=60)
    assert code == 1
    assert f"gRPC port {port} on 127.0.0.1 is already in use" in output and "--grpc-port" in output
    assert "Traceback" not in output and "loaded" not in output  # no model was loaded


def test_help_is_fast_grouped_and_shows_no_flag_types():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "tgis_cli", "serve", "-h"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env={"COLUMNS": "120", "PATH": ""})
    assert out.returncode == 0, out.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert not imported & {"torch", "transformers", "grpc"}  # help never pays for them
    for panel in ("Model", "Engine", "Limits and batching", "Prompt prefixes and adapters", "Output", "Network and TLS",
                  "Process"):
        assert f"─ {panel} ─" in out.stdout
    flag_line = next(line for line in out.stdout.splitlines() if "--trust-remote-code" in line)
    assert "<bool>" not in flag_line


"""`tgis serve` runs the engine core in its own process: a dead engine process stops the server (exit 1, reason in
the termination log) instead of leaving a server that accepts requests it can never answer."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from server_harness import run_to_exit, running_server

from proto import generation_pb2 as pb

T = 60


def _engine_pid(server: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{server}/task").iterdir():
            for child in (task / "children").read_text().split():
                if b"multiprocessing.spawn" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
        time.sleep(0.1)
    raise AssertionError("no engine process found")


@pytest.mark.timeout(180)
def test_engine_process_death_stops_the_server(tiny_model, tmp_path):
    import os

    with running_server(tiny_model("llama"), tmp_path) as server:
        with server.channel() as channel:
            stub = server.stub(channel)
            resp = stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="Hello")],
                                                             params=pb.Parameters()), timeout=T)
            assert resp.responses[0].generated_token_count > 0
            stream = stub.GenerateStream(pb.SingleGenerationRequest(
                request=pb.GenerationRequest(text="Hello"),
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=500, min_new_tokens=500))),
                timeout=T)
            next(stream)
            os.kill(_engine_pid(server.proc.pid), signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:  # failed at once, not left to the shutdown grace period
                list(stream)
            assert err.value.code() == grpc.StatusCode.UNKNOWN
            assert err.value.details() == "Request failed during generation: the engine process exited with code -9"
        assert server.wait(timeout=60) == 1
        assert time.monotonic() - killed < 10
        assert "the engine process exited with code -9" in server.termination_log.read_text()


def test_start_failure_in_the_server_process_stops_the_engine_process(tiny_model, tmp_path):
    """No tokenizer files: the server process fails while the engine process loads; it must not be left behind
    (a non-daemon child would also block the server's exit)."""
    import shutil

    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model("llama") / name, model / name)
    code, output = run_to_exit(model, tmp_path / "run", timeout=120)
    assert code == 1, output
    assert (tmp_path / "run" / "termination-log").read_text()

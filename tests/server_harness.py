"""Run the real `tgis serve` in a subprocess on free loopback ports for integration tests.

The server gets its own process group and is always killed on teardown; start-up and shutdown have hard timeouts,
and a failed start raises with the tail of the server's log.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from proto import generation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 30.0, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """GET over plain HTTP, or HTTPS with `context` (the server's certificate names `localhost`)."""
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection("localhost", port, timeout=timeout, context=context)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    log_path: Path
    termination_log: Path
    http_ssl: ssl.SSLContext | None = None  # the client side of the HTTP port's TLS, when the server has TLS

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stub(self, channel: grpc.Channel | None = None) -> pb_grpc.GenerationServiceStub:
        return pb_grpc.GenerationServiceStub(channel or self.channel())

    def http(self, path: str) -> tuple[int, bytes]:
        return http_get(self.http_port, path, context=self.http_ssl)

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}."""
        status, body = self.http("/metrics")
        assert status == 200
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def serve_command(model: Path | str | None, grpc_port: int, http_port: int, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "tgis_cli", "serve", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
           "--port", str(http_port)]
    if model is not None:
        cmd += ["--model-name", str(model)]
    return cmd + list(args)


def server_env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", TERMINATION_LOG_PATH=str(tmp / "termination-log"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env | (extra or {})


@contextlib.contextmanager
def running_server(model: Path | str | None, tmp: Path, *args: str, env: dict[str, str] | None = None,
                   startup_timeout: float = 180.0, ready: str = "/health",
                   http_ssl: ssl.SSLContext | None = None) -> Iterator[ServerProcess]:
    """Start `tgis serve`, wait until `ready` answers 200 over HTTP, yield, then SIGTERM (10 s) and SIGKILL."""
    tmp.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = free_port(), free_port()
    log_path = tmp / f"server-{grpc_port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(serve_command(model, grpc_port, http_port, *args), cwd=REPO,
                                env=server_env(tmp, env), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = ServerProcess(proc, grpc_port, http_port, log_path, tmp / "termination-log", http_ssl)
    try:
        _wait_ready(server, ready, startup_timeout)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        server.kill()


def _wait_ready(server: ServerProcess, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"tgis serve exited with {server.proc.returncode}:\n{server.logs()[-4000:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if server.http(path)[0] == 200:
                return
        time.sleep(0.2)
    server.kill()
    raise TimeoutError(f"tgis serve not ready after {timeout} s:\n{server.logs()[-4000:]}")


def run_to_exit(model: Path | str | None, tmp: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 120.0) -> tuple[int, str]:
    """Run `tgis serve` expecting it to fail at start: (exit code, combined output)."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(serve_command(model, free_port(), free_port(), *args), cwd=REPO, env=server_env(tmp, env),
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr

"""Plain HTTP on port 3000: `/health` and `/metrics` (spec §4.6, §4.7), served by stdlib threads.

Handlers run on their own threads; the health check is a coroutine of the engine, so it is submitted to the server's
event loop and waited for with TGIS' 60 s limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 60.0
UNHEALTHY = b'{"error":"unhealthy"}'
TIMED_OUT = b'{"error":"Healthcheck timed-out"}'


class HealthMetricsServer:
    """`check_health` returns a coroutine resolving to True when healthy; `render_metrics` the /metrics body."""

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop,
                 check_health: Callable[[], Coroutine[None, None, bool]], render_metrics: Callable[[], bytes]):
        self._loop, self._check_health, self._render_metrics = loop, check_health, render_metrics
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                status, body, ctype = owner.respond(self.path.split("?", 1)[0])
                self.send_response(status)
                if body:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                log.debug("http: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="tgis-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def respond(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, self._render_metrics(), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/health":
            return self._health()
        return 404, b"", ""

    def _health(self) -> tuple[int, bytes, str]:
        future = asyncio.run_coroutine_threadsafe(self._check_health(), self._loop)
        try:
            healthy = future.result(timeout=HEALTH_TIMEOUT_S)
        except FutureTimeout:
            future.cancel()
            return 503, TIMED_OUT, "application/json"
        except Exception:
            log.exception("health check failed")
            healthy = False
        return (200, b"", "") if healthy else (503, UNHEALTHY, "application/json")

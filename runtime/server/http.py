"""The HTTP port (PORT, 3000): `/health` and `/metrics` exactly as TGIS (spec §4.6, §4.7), and beside them mounted
ASGI apps (the OpenAI API under `/v1`), all served by uvicorn in the server's own event loop.

One event loop serves every connection, so idle clients cost a socket, not a thread; a connection idle for
`IDLE_TIMEOUT_S` (before its first request or between requests) is closed. Any other path is a bare 404, as in TGIS.
Over TLS, each request's scope carries the ASGI `tls` extension with the verified client certificate, if any.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine, Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 5
UNHEALTHY = b'{"error":"unhealthy"}'
TIMED_OUT = b'{"error":"Healthcheck timed-out"}'
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def health_metrics_app(check_health: Callable[[], Coroutine[None, None, bool]], render_metrics: Callable[[], bytes],
                       mounts: Sequence[BaseRoute] = ()) -> Starlette:
    """`check_health` returns a coroutine resolving to True when healthy; `render_metrics` the /metrics body."""

    async def health(request: Request) -> Response:
        try:
            healthy = await asyncio.wait_for(check_health(), HEALTH_TIMEOUT_S)
        except TimeoutError:
            return Response(TIMED_OUT, 503, media_type="application/json")
        except Exception:
            log.exception("health check failed")
            healthy = False
        return Response(status_code=200) if healthy else Response(UNHEALTHY, 503, media_type="application/json")

    async def metrics(request: Request) -> Response:
        return Response(render_metrics(), media_type=METRICS_TYPE)

    async def bare(request: Request, exc: HTTPException) -> Response:
        return Response(status_code=exc.status_code, headers=exc.headers)

    routes = [Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]), *mounts]
    app = Starlette(routes=routes, exception_handlers={HTTPException: bare})
    app.router.redirect_slashes = False  # `/health/` is another path: 404, as in TGIS
    return app


def client_certificate(scope) -> str | None:
    """The verified client certificate (PEM) of the connection a request came on, None without one."""
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain")
    return chain[0] if chain else None


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: (1) uvicorn closes a keep-alive connection only once it has answered on it;
    this also closes a connection that does not complete a request head within the idle timeout of opening or of
    its last response; (2) the client certificate of a TLS connection is put in the scope (uvicorn omits it)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [], "client_cert_error": None}
            self.app = functools.partial(_with_tls_extension, self.app, tls)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.handle_events()
        if self.cycle is not None and not self.cycle.response_complete:  # a request is being served
            self._unset_keepalive_if_required()


async def _with_tls_extension(app, tls: dict, scope, receive, send) -> None:
    scope.setdefault("extensions", {})["tls"] = tls
    await app(scope, receive, send)


class _Server(uvicorn.Server):
    def capture_signals(self):
        """SIGTERM/SIGINT belong to the server process, which stops every listener itself."""
        return contextlib.nullcontext()


class HttpServer:
    """An ASGI app on `host:port` (TLS when `ssl_context` is given); `stop` lets running responses finish for up to
    `grace_s` seconds."""

    def __init__(self, app, host: str, port: int, ssl_context: ssl.SSLContext | None = None, grace_s: float = 30.0):
        self._host, self._requested_port = host, port
        self._server = _Server(uvicorn.Config(
            app, http=_Protocol, lifespan="off", log_config=None, log_level="warning", access_log=False,
            timeout_keep_alive=IDLE_TIMEOUT_S, timeout_graceful_shutdown=grace_s,
            ssl_context_factory=(lambda config, default: ssl_context) if ssl_context else None))
        self._socket: socket.socket | None = None
        self._task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    async def start(self) -> None:
        """Bind (a busy port fails here, named) and serve until `stop`."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:
            self._socket = socket.create_server((self._host, self._requested_port), family=family)
        except OSError as exc:
            raise OSError(f"cannot listen on HTTP port {self._host}:{self._requested_port}: {exc.strerror}") from exc
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it stopped
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._socket.close()

"""Minimal asyncio HTTP/1.1 client: the OpenAI target streams server-sent events with it, and both server targets
read /metrics. No client library is needed for two verbs and one connection per request (`Connection: close`)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoding, else up to Content-Length or EOF)."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await self.reader.readline()).split(b";")[0].strip() or b"0", 16):
                yield await self.reader.readexactly(size)
                await self.reader.readline()
            return
        length = self.headers.get("content-length")
        if length is not None:
            yield await self.reader.readexactly(int(length))
            return
        while data := await self.reader.read(65536):
            yield data

    async def lines(self) -> AsyncIterator[str]:
        """The body line by line, each yielded as soon as its end arrives (what server-sent events need)."""
        pending = b""
        async for data in self.chunks():
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.rstrip(b"\r").decode("utf-8", errors="replace")
        if pending:
            yield pending.decode("utf-8", errors="replace")

    async def body(self) -> bytes:
        return b"".join([data async for data in self.chunks()])

    def close(self) -> None:
        self.writer.close()


async def request(url: str, method: str = "GET", payload: dict | None = None, timeout: float | None = None,
                  headers: dict[str, str] | None = None) -> Response:
    """Send a request and read the status line and headers; the caller reads the body and closes."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    context = ssl.create_default_context() if parts.scheme == "https" else None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port, ssl=context), timeout)
    body = json.dumps(payload).encode() if payload is not None else b""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if payload is not None:
        lines.append("Content-Type: application/json")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    status_line = b""
    try:
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        fields = {}
        while (line := await asyncio.wait_for(reader.readline(), timeout)) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
    except (IndexError, ValueError, TimeoutError) as exc:
        writer.close()
        raise OSError(f"{url}: no HTTP response ({status_line[:80]!r})") from exc
    return Response(status, fields, reader, writer)


async def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET."""
    response = await request(url, timeout=timeout)
    try:
        return response.status, await asyncio.wait_for(response.body(), timeout)
    finally:
        response.close()

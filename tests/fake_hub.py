"""A loopback HTTP server answering the part of the Hugging Face Hub API that huggingface_hub's downloads use.

Endpoints (found by logging what `HfApi.model_info` and `hf_hub_download` request):
  GET  /api/models/{org}/{name}[/revision/{rev}]   model info: `id`, `sha`, `gated`, `siblings` (with sizes)
  HEAD /{org}/{name}/resolve/{rev}/{file}          metadata: `ETag`, `X-Repo-Commit`, `Content-Length`
  GET  /{org}/{name}/resolve/{rev}/{file}          content, honouring `Range: bytes=N-` (resumed downloads)
Errors carry the `X-Error-Code` header huggingface_hub maps to exceptions: `RepoNotFound` (401, as the real Hub
answers anonymous callers), `GatedRepo` (401 without a valid token), `RevisionNotFound`, `EntryNotFound` (404).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name])
        self.sha = h.hexdigest()

    def etag(self, name: str) -> str:
        """LFS files are tagged by their sha256, regular files by their git blob sha1 (as on the real Hub)."""
        data = self.files[name]
        if name.endswith(LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Serve repos on 127.0.0.1 in a daemon thread; `requests` records every (method, path) served."""

    def __init__(self, token: str = "hf_fake_valid_token") -> None:
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, int]] = []  # (path, first byte) of every Range request served
        self.truncate_once: set[str] = set()  # file names whose next GET drops the connection half-way
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], gated: bool = False) -> FakeRepo:
        self.repos[repo_id] = FakeRepo(files, gated)
        return self.repos[repo_id]

    def add_dir(self, repo_id: str, directory: Path, gated: bool = False) -> FakeRepo:
        files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
        return self.add_repo(repo_id, files, gated)

    def downloads(self) -> list[str]:
        """Paths of file contents served (GET on resolve URLs)."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            self._route(body=True)

        def do_HEAD(self) -> None:
            self._route(body=False)

        def _route(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            if m := _INFO.match(path):
                self._model_info(m.group(1), m.group(2) or "main")
            elif m := _RESOLVE.match(path):
                self._resolve(m.group(1), m.group(2), m.group(3), body)
            else:
                self._error(404, "NotFound", "unknown endpoint")

        def _repo(self, repo_id: str, revision: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
            elif revision not in ("main", repo.sha):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            else:
                return repo
            return None

        def _model_info(self, repo_id: str, revision: str) -> None:
            if (repo := self._repo(repo_id, revision)) is None:
                return
            siblings = [{"rfilename": n, "size": len(d), "blobId": repo.etag(n)} for n, d in sorted(repo.files.items())]
            info = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                    "gated": "auto" if repo.gated else False, "disabled": False, "siblings": siblings}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), True)

        def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            if (repo := self._repo(repo_id, revision)) is None:
                return
            if repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. Please log in.")
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound", f"{name} does not exist on {revision}")
                return
            data, status = repo.files[name], 200
            headers = {"ETag": f'"{repo.etag(name)}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if body and name in hub.truncate_once:
                hub.truncate_once.discard(name)
                self._send_truncated(headers, data)
                return
            if body and (rng := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))):
                start = int(rng.group(1))
                hub.ranges.append((urlsplit(self.path).path, start))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                data, status = data[start:], 206
            self._send(status, headers, data, body)

        def _send_truncated(self, headers: dict[str, str], data: bytes) -> None:
            """Announce the whole file, send half, hang up: a dropped connection the client must resume."""
            self.close_connection = True
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()

        def _error(self, status: int, code: str, message: str) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            self._send(status, headers, json.dumps({"error": message}).encode(), self.command != "HEAD")

        def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler

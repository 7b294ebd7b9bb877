"""gRPC server credentials: TLS, or mutual TLS when a client CA is given (spec §4.5). HTTP stays plain."""

from __future__ import annotations

from pathlib import Path

import grpc


class TLSError(ValueError):
    pass


def _load(kind: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSError(f"couldn't load {kind} from {path}") from exc


def server_credentials(cert_path: str | None, key_path: str | None,
                       client_ca_path: str | None) -> grpc.ServerCredentials | None:
    """None for plaintext; files are read now so a missing one fails at start with TGIS' message."""
    if not cert_path or not key_path:
        return None
    cert, key = _load("cert", cert_path), _load("key", key_path)
    ca = _load("client ca cert", client_ca_path) if client_ca_path else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

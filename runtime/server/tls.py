"""Server TLS: gRPC credentials, and the HTTP port's SSL context from the same files (spec §4.5). Unlike TGIS, whose
HTTP port stays plain, the HTTP port here also carries the OpenAI API, so it gets TLS too; with a client CA, the
OpenAI API requires a client certificate while /health and /metrics do not (kubelet probes and Prometheus scrapes
present none, as they reach TGIS' plain port)."""

from __future__ import annotations

import ssl
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


def http_ssl_context(cert_path: str | None, key_path: str | None,
                     client_ca_path: str | None) -> ssl.SSLContext | None:
    """None for plaintext. With a client CA, a client certificate is asked for and, when presented, verified
    against it (a bad one fails the handshake); the HTTP app decides which paths need one. Files that do not hold
    a usable certificate, key or CA fail here, at start, with the reason."""
    if not cert_path or not key_path:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"tls: invalid certificate {cert_path} or key {key_path}: {exc}") from exc
    if client_ca_path:
        try:
            context.load_verify_locations(cafile=client_ca_path)
        except (OSError, ssl.SSLError) as exc:
            raise TLSError(f"tls: invalid client ca cert {client_ca_path}: {exc}") from exc
        context.verify_mode = ssl.CERT_OPTIONAL
    return context

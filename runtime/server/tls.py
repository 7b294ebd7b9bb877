"""gRPC server credentials: TLS, or mutual TLS when a client CA is given (spec §4.5). HTTP stays plain.

Files are read and checked at start: grpcio accepts any bytes as a key and only fails later, when binding the
port, with "Failed to bind to address" (the real cause goes to grpc's own stderr). Python's ssl module parses the
same PEM files first, so a bad key, a key that does not belong to the certificate, or a bad CA file fails start-up
with a message that names the file and the problem.
"""

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


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code in words (` (no certificate or crl found)`), or nothing when it gave none."""
    return f" ({exc.reason.replace('_', ' ').lower()})" if exc.reason else ""


def check_pem(cert_path: str, key_path: str, client_ca_path: str | None) -> None:
    """TLSError unless the certificate, its private key (unencrypted) and the client CA parse and belong together."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=cert_path)
    except ssl.SSLError as exc:
        raise TLSError(f"tls: {cert_path} is not a PEM certificate{_reason(exc)}") from exc
    try:
        context.load_cert_chain(cert_path, key_path, password="")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(f"tls: the key in {key_path} does not belong to the certificate in {cert_path}") from exc
        raise TLSError(f"tls: {key_path} is not an unencrypted PEM private key{_reason(exc)}") from exc
    if client_ca_path:
        try:
            context.load_verify_locations(cafile=client_ca_path)
        except ssl.SSLError as exc:
            raise TLSError(f"tls: {client_ca_path} is not a PEM CA certificate{_reason(exc)}") from exc


def server_credentials(cert_path: str | None, key_path: str | None,
                       client_ca_path: str | None) -> grpc.ServerCredentials | None:
    """None for plaintext; files are read now so a missing one fails at start with TGIS' message."""
    if not cert_path or not key_path:
        return None
    cert, key = _load("cert", cert_path), _load("key", key_path)
    ca = _load("client ca cert", client_ca_path) if client_ca_path else None
    check_pem(cert_path, key_path, client_ca_path)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

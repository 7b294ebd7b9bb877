"""Server TLS: gRPC credentials, and the HTTP port's SSL context from the same files (spec §4.5). Unlike TGIS, whose
HTTP port stays plain, the HTTP port here also carries the OpenAI API, so it gets TLS too; with a client CA, the
OpenAI API requires a client certificate while /health and /metrics do not (kubelet probes and Prometheus scrapes
present none, as they reach TGIS' plain port).

Files are read and checked at start, by Python's ssl module: grpcio accepts any bytes as a key and only fails later,
when binding the port, with "Failed to bind to address" (the real cause goes to grpc's own stderr), so a bad key, a
key that does not belong to the certificate, or a bad CA file fails start-up with a message naming the file and the
problem.
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


def _checked_context(cert_path: str, key_path: str, client_ca_path: str | None) -> ssl.SSLContext:
    """A server context holding the certificate and its (unencrypted) key, trusting the client CA if given;
    TLSError naming the file that does not parse or the key that does not belong to the certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert_path)  # parses it, trusts nothing
    except ssl.SSLError as exc:
        raise TLSError(f"tls: {cert_path} is not a PEM certificate{_reason(exc)}") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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
    return context


def server_credentials(cert_path: str | None, key_path: str | None,
                       client_ca_path: str | None) -> grpc.ServerCredentials | None:
    """None for plaintext; files are read now so a missing one fails at start with TGIS' message."""
    if not cert_path or not key_path:
        return None
    cert, key = _load("cert", cert_path), _load("key", key_path)
    ca = _load("client ca cert", client_ca_path) if client_ca_path else None
    _checked_context(cert_path, key_path, client_ca_path)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def http_ssl_context(cert_path: str | None, key_path: str | None,
                     client_ca_path: str | None) -> ssl.SSLContext | None:
    """None for plaintext. With a client CA, a client certificate is asked for and, when presented, verified
    against it (a bad one fails the handshake); the HTTP app decides which paths need one."""
    if not cert_path or not key_path:
        return None
    context = _checked_context(cert_path, key_path, client_ca_path)
    if client_ca_path:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context

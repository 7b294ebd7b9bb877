"""TLS and mutual TLS on the gRPC port and on the HTTP port (unlike TGIS, whose HTTP port stays plain: here it
carries the OpenAI API; with mutual TLS, /health and /metrics still answer clients without a certificate, such as
kubelet probes), and start-up failures (bad options, unreadable TLS files) that must exit non-zero with TGIS'
message in the termination log."""

from __future__ import annotations

import http.client
import ssl

import grpc
import pytest
import trustme
from server_harness import http_get, run_to_exit, running_server

from proto import generation_pb2 as pb
from proto import generation_pb2_grpc as pb_grpc

TIMEOUT = 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    client = ca.issue_cert("client.example")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    ca.cert_pem.write_to_path(paths["ca"])
    server.private_key_pem.write_to_path(paths["key"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    creds = {"root_certificates": ca.cert_pem.bytes(), "private_key": client.private_key_pem.bytes(),
             "certificate_chain": client.cert_chain_pems[0].bytes()}
    https = ssl.create_default_context()
    ca.configure_trust(https)
    https_client = ssl.create_default_context()
    ca.configure_trust(https_client)
    client.configure_cert(https_client)
    https_stranger = ssl.create_default_context()  # a client certificate from another CA
    ca.configure_trust(https_stranger)
    trustme.CA().issue_cert("stranger.example").configure_cert(https_stranger)
    return paths, creds, (https, https_client, https_stranger)


def _model_info(target: str, credentials: grpc.ChannelCredentials | None) -> pb.ModelInfoResponse:
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "localhost")])
    with channel:
        return pb_grpc.GenerationServiceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT)


def test_tls_and_mtls(tiny_model, pki, tmp_path):
    paths, client, (https, https_client, https_stranger) = pki
    model = tiny_model("gpt2")
    tls = ("--tls-cert-path", str(paths["cert"]), "--tls-key-path", str(paths["key"]))
    with running_server(model, tmp_path / "tls", *tls, http_ssl=https) as server:
        info = _model_info(server.target, grpc.ssl_channel_credentials(client["root_certificates"]))
        assert info.max_sequence_length > 0 and info.model_kind == pb.ModelInfoResponse.DECODER_ONLY
        with pytest.raises(grpc.RpcError) as err:
            _model_info(server.target, None)  # plaintext against TLS
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.http("/health") == (200, b"")  # HTTPS
        assert server.http("/v1/models")[0] == 200
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP against TLS
            http_get(server.http_port, "/health", timeout=TIMEOUT)
    with running_server(model, tmp_path / "mtls", *tls, "--tls-client-ca-cert-path", str(paths["ca"]),
                        http_ssl=https_client) as server:
        assert _model_info(server.target, grpc.ssl_channel_credentials(**client)).max_sequence_length > 0
        with pytest.raises(grpc.RpcError) as err:
            _model_info(server.target, grpc.ssl_channel_credentials(client["root_certificates"]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.http("/health") == (200, b"")  # HTTPS with the client's certificate
        assert server.http("/v1/models")[0] == 200
        anonymous = http_get(server.http_port, "/v1/models", timeout=TIMEOUT, context=https)
        assert anonymous[0] == 401 and b"a client certificate is required" in anonymous[1]
        for path in ("/health", "/metrics"):  # probes and scrapes present no certificate
            assert http_get(server.http_port, path, timeout=TIMEOUT, context=https)[0] == 200
        with pytest.raises(OSError):  # a certificate the client CA did not sign fails the handshake
            http_get(server.http_port, "/health", timeout=TIMEOUT, context=https_stranger)


@pytest.mark.parametrize(("args", "env", "message"), [
    (("--tls-cert-path", "/nonexistent/cert.pem", "--tls-key-path", "/nonexistent/key.pem"), {},
     "couldn't load cert from /nonexistent/cert.pem"),
    (("--tls-cert-path", "/etc/hostname"), {}, "tls: must provide both cert and key"),
    (("--tls-cert-path", "/etc/hostname", "--tls-key-path", "/etc/hostname"), {},
     "tls: /etc/hostname is not a PEM certificate (no certificate or crl found)"),
    ((), {"MAX_SEQUENCE_LENGTH": "1"}, "max_sequence_length (1) must be at least 2 (1 input + 1 output)"),
    ((), {"MAX_CONCURRENT_REQUESTS": "0"}, "max_concurrent_requests must be > 0"),
    (("--model-name", "/nonexistent-model-dir"), {}, "/nonexistent-model-dir"),
    (("--dtype", "float8"), {}, "Unrecognized data type: float8"),
    (("--num-gpus", "5"), {}, "the model cannot be split into 5 tensor-parallel ranks"),  # checked before loading
    (("--kv-cache-tokens", "16", "--max-sequence-length", "64"), {},  # raised in the engine process
     "kv_cache_tokens (16) must be at least one full request's slots (64 for max_sequence_length 64)"),
])
def test_fatal_start_errors_go_to_termination_log(tmp_path, args, env, message):
    code, output = run_to_exit(None, tmp_path, *args, env=env)
    assert code == 1, output
    assert message in (tmp_path / "termination-log").read_text()
    assert message in output


def test_unparseable_env_value_fails_before_start(tmp_path):
    code, output = run_to_exit(None, tmp_path, env={"MAX_BATCH_SIZE": "many"})
    assert code == 2 and "(env var: 'MAX_BATCH_SIZE')" in output and "['" not in output  # no Python list repr


def test_bad_tls_files_fail_start_with_their_real_cause(pki, tmp_path):
    """grpcio would only say "Failed to bind to address" once the model had loaded; the files are checked first."""
    paths = pki[0]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    other_key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(other_key)
    cases = [
        ((paths["cert"], garbage), f"tls: {garbage} is not an unencrypted PEM private key"),
        ((paths["cert"], other_key), f"tls: the key in {other_key} does not belong to the certificate in "
                                     f"{paths['cert']}"),
        ((garbage, paths["key"]), f"tls: {garbage} is not a PEM certificate (no certificate or crl found)"),
        ((paths["cert"], paths["key"], garbage), f"tls: {garbage} is not a PEM CA certificate"),
    ]
    for files, message in cases:
        flags = ("--tls-cert-path", "--tls-key-path", "--tls-client-ca-cert-path")
        args = [a for flag, path in zip(flags, files, strict=False) for a in (flag, str(path))]
        code, output = run_to_exit(None, tmp_path, *args)
        assert code == 1 and message in output and "Failed to bind" not in output, output
        assert message in (tmp_path / "termination-log").read_text()

"""`tgis serve` wiring: check every option that can be checked without the model (values, TLS files, free ports,
device, tensor-parallel split), resolve the model and limits, load the engine, start gRPC (with health and
reflection) and HTTP, then drain on SIGTERM/SIGINT and exit 0. A fatal start-up error goes to the termination log
and exits 1.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime.config import ConfigError, ServerConfig, check_engine_options
from runtime.default_model import DEFAULT_MODEL_NAME
from runtime.engine.config import EngineConfig
from runtime.hub import resolve_model_or_default
from runtime.server.http import HttpServer, health_metrics_app
from runtime.server.metrics import Metrics
from runtime.server.ports import check_bindable
from runtime.server.tls import http_ssl_context, server_credentials
from runtime.server.wire import SERVICE, add_generation_service
from runtime.threads import tokenization_workers

if TYPE_CHECKING:
    from runtime.models.prefixes import PrefixStore

log = logging.getLogger("tgis.server")

SERVICE_NAME = SERVICE.full_name
# grpc.health.v1 names answered SERVING once the model is loaded (Kubernetes' native gRPC probes ask for them)
HEALTH_SERVICES = ("", SERVICE_NAME)
_LOG_EXTRAS = ("correlation_id", "request_id", "input_toks")


class _Formatter(logging.Formatter):
    """Text or JSON lines; request fields (correlation id, ...) are appended / included when present."""

    def __init__(self, as_json: bool):
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        extras = {k: getattr(record, k) for k in _LOG_EXTRAS if hasattr(record, k)}
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps({"timestamp": self.formatTime(record), "level": record.levelname,
                               "target": record.name, "message": message, **extras}, ensure_ascii=False)
        tail = "".join(f" {k}={v}" for k, v in extras.items())
        return f"{self.formatTime(record)} {record.levelname} {record.name}: {message}{tail}"


def configure_logging(as_json: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(_Formatter(as_json))
    if as_json:  # progress bars would break the one-JSON-object-per-line contract
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def write_termination_log(path: str, message: str) -> None:
    """Best effort, as TGIS: the file may not exist or be writable outside Kubernetes."""
    try:
        Path(path).write_text(message)
    except OSError:
        pass


def resolve_limits(config: ServerConfig, model_dir: Path) -> tuple[int, int]:
    """(S, effective max_new_tokens): S from the option, else the model config keys of spec §4.3, else 2048; the
    server's max_new_tokens is lowered to S - 1 when it does not fit."""
    from runtime.models.loader import DEFAULT_MAX_SEQUENCE_LENGTH, model_max_sequence_length

    model_s = model_max_sequence_length(model_dir)
    if config.max_sequence_length:
        s, source = config.max_sequence_length, "user-defined"
        if model_s and s > model_s:
            log.warning("max_sequence_length %d is larger than the model's (%d)", s, model_s)
    elif model_s:
        s, source = model_s, "model"
    else:
        s, source = DEFAULT_MAX_SEQUENCE_LENGTH, "default"
    log.info("Using %s max_sequence_length: %d", source, s)
    max_new = config.max_new_tokens
    if max_new >= s:
        log.warning("max_new_tokens (%d) lowered to max_sequence_length - 1 (%d)", max_new, s - 1)
        max_new = s - 1
    return s, max_new


def engine_config(config: ServerConfig, model_dir: Path, max_sequence_length: int) -> EngineConfig:
    return EngineConfig(
        model_path=str(model_dir), dtype=config.effective_dtype, device=config.device,
        max_sequence_length=max_sequence_length, max_batch_size=config.max_batch_size,
        max_waiting_tokens=config.max_waiting_tokens, max_num_batched_tokens=config.max_num_batched_tokens,
        chunked_prefill=config.chunked_prefill, prefix_caching=config.prefix_caching, engine=config.effective_engine,
        cuda_graphs=config.cuda_graphs, compile=config.pt2_compile, load_format=config.load_format,
        async_scheduling=config.async_scheduling,
        kv_cache_tokens=config.kv_cache_tokens, kv_cache_memory_fraction=config.kv_cache_memory_fraction,
        kv_cache_dtype=config.kv_cache_dtype,
        output_special_tokens=config.output_special_tokens, trust_remote_code=config.trust_remote_code,
        tensor_parallel_size=config.world_size, tensor_parallel_method=config.effective_tensor_parallel_method,
        cuda_memory_fraction=config.cuda_process_memory_fraction)


def prefix_store(config: ServerConfig, engine) -> PrefixStore | None:
    """The prompt-prefix store when PREFIX_STORE_PATH is set (spec §5.4); limits are checked here, at start."""
    from runtime.models.prefixes import PrefixStore

    if not config.prefix_store_path:
        return None
    s = engine.max_sequence_length
    max_length = config.max_prompt_prefix_length or math.ceil(s / 2)
    if max_length > s - 1:
        raise ConfigError(f"Value for the MAX_PROMPT_PREFIX_LENGTH ({max_length}) cannot be larger than the max "
                          f"sequence length - 1 ({s - 1})")
    facts = engine.facts
    if facts.embedding_dim is None:
        log.warning("Could not find input embedding layer for model - prompt prefixes disabled")
        return None
    log.info("Prompt prefixes from %s (at most %d virtual tokens, %d MB cache)", config.prefix_store_path,
             max_length, config.prompt_cache_size_mb)
    return PrefixStore(config.prefix_store_path, facts.embedding_dim, facts.dtype, facts.is_encoder_decoder,
                       max_length, config.prompt_cache_size_mb << 20, facts.pad_token_id)


def run(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT; the process exit code."""
    configure_logging(config.json_output)
    try:
        return asyncio.run(_serve(config))
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
        expected = isinstance(exc, ValueError)  # a bad option or file: the message says it all
        debug = log.isEnabledFor(logging.DEBUG)
        hint = "" if expected or debug else " (rerun with `tgis --log-level debug serve ...` for the traceback)"
        log.error("fatal: %s%s", message, hint, exc_info=debug and not expected)
        write_termination_log(config.termination_log_path, message)
        return 1


async def _serve(config: ServerConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config.validate()
    credentials = server_credentials(config.tls_cert_path, config.tls_key_path, config.tls_client_ca_cert_path)
    http_ssl = http_ssl_context(config.tls_cert_path, config.tls_key_path, config.tls_client_ca_cert_path)
    check_bindable(config.host, config.grpc_port, "gRPC", "--grpc-port / GRPC_PORT")
    check_bindable(config.host, config.port, "HTTP", "--port / PORT")
    model_dir = resolve_model_or_default(config.model_name, config.revision)
    check_engine_options(model_dir, config.effective_dtype, config.device, config.world_size,
                         config.effective_tensor_parallel_method)
    max_sequence_length, max_new_tokens = resolve_limits(config, model_dir)

    from runtime.engine.process import ProcessEngine

    started = time.monotonic()
    engine = await asyncio.to_thread(ProcessEngine, engine_config(config, model_dir, max_sequence_length),
                                     functools.partial(configure_logging, config.json_output))
    log.info("Model %s loaded in %.1f s", model_dir, time.monotonic() - started)
    try:
        return await _run_servers(config, engine, credentials, http_ssl, max_new_tokens, stop)
    finally:
        engine.shutdown()


async def _run_servers(config: ServerConfig, engine, credentials, http_ssl, max_new_tokens: int,
                       stop: asyncio.Event) -> int:
    # torch and the engine's types: imported once the options are known good
    from runtime.server.frontend import FrontEnd
    from runtime.server.grpc_service import GenerationServicer
    from runtime.server.openai_api.service import OpenAIApi

    metrics = Metrics(engine.max_sequence_length, max_new_tokens, config.max_batch_size)
    engine.add_step_listener(metrics.on_step)
    front = FrontEnd(engine, metrics, max_new_tokens, config.max_concurrent_requests,  # shared by gRPC and HTTP
                     config.tokenization_workers or tokenization_workers(config.world_size))
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", config.max_request_bytes)])
    servicer = GenerationServicer(front, config.default_include_stop_seqs, prefix_store(config, engine),
                                  config.max_top_n_tokens)
    add_generation_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.grpc_port}"
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # taken since the check at start
        raise ConfigError(f"cannot listen on {address} for gRPC ({exc}): choose another --grpc-port") from exc
    await server.start()
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    openai = OpenAIApi(front, config.model_name or DEFAULT_MODEL_NAME, bool(config.tls_client_ca_cert_path))
    http = HttpServer(health_metrics_app(engine.check_health, metrics.render, [openai.route()]), config.host,
                      config.port, http_ssl, config.shutdown_grace_period)
    await http.start()
    log.info("Serving %s on %s and /health, /metrics, the OpenAI API (/v1, model %s) on %s:%d (%s)", SERVICE_NAME,
             address, openai.model_name, config.host, http.port,
             "mTLS" if config.tls_client_ca_cert_path else "TLS" if credentials else "plaintext")
    code = await _until_stop_or_failure(engine, stop)
    if code:
        write_termination_log(config.termination_log_path, engine.failure)
    log.info("Shutting down: finishing in-flight requests (grace period %.0f s)", config.shutdown_grace_period)
    await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(http.stop(), server.stop(config.shutdown_grace_period))
    await servicer.close()
    log.info("Shutdown complete")
    return code


async def _until_stop_or_failure(engine, stop: asyncio.Event, poll_s: float = 0.5) -> int:
    """0 on SIGTERM/SIGINT; 1 when the engine can no longer serve (a tensor-parallel rank died): as TGIS' launcher,
    the server then stops so that its supervisor restarts it."""
    while not stop.is_set():
        if engine.failure:
            log.error("fatal: %s", engine.failure)
            return 1
        try:
            await asyncio.wait_for(stop.wait(), poll_s)
        except TimeoutError:
            pass
    return 0

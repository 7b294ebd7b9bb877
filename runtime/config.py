"""Every `tgis serve` option in one table: the `ServerConfig` fields.

Each field carries its CLI flags, its TGIS environment variable(s), its help panel, its help and its range check in
the field metadata, so `serve --help`, environment parsing (the command is generated from this table) and start-up
validation can never drift apart. Names, variables and defaults follow the TGIS launcher (spec §4.1, §4.4); options
that only exist in our engine (KV cache, device, prefill budget, request bounds) follow the same pattern.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.engine.config import ENGINES, KV_CACHE_DTYPES, TP_METHODS

DTYPES = ("float32", "float16", "bfloat16", "float", "half")
# TGIS DEPLOYMENT_FRAMEWORK -> engine; ds_inference also makes DeepSpeed AutoTP split the model over the ranks
FRAMEWORKS = {"tgis_native": "native", "hf_custom_tp": "native", "hf_transformers": "transformers",
              "ds_inference": "transformers"}
# `serve --help` panels, in the order they are shown
MODEL, ENGINE, LIMITS, ADAPTERS, OUTPUT, NETWORK, PROCESS = (
    "Model", "Engine", "Limits and batching", "Prompt prefixes and adapters", "Output", "Network and TLS", "Process")


class ConfigError(ValueError):
    """A bad option value: the server refuses to start with this message."""


def _opt(default: Any, *flags: str, env: str | tuple[str, ...] = (), panel: str, help: str,
         check: tuple[typing.Callable[[Any], bool], str] | None = None, explicit_bool: bool = False) -> Any:
    """A config field: default plus the CLI/env/panel/help/check metadata `serve` is generated from.

    `check` is (predicate on a non-None value, message with `{value}`); `explicit_bool` makes a boolean take a value
    (`--default-include-stop-seqs false`) instead of being a flag, as in TGIS."""
    envs = (env,) if isinstance(env, str) else env
    meta = {"flags": flags, "env": envs, "panel": panel, "help": help, "check": check, "explicit_bool": explicit_bool}
    return field(default=default, metadata=meta)


def _positive(v) -> bool:
    return v > 0


def _port(v) -> bool:
    return 0 < v < 65536


def _fraction(v) -> bool:
    return 0 < v <= 1


def _not_negative(v) -> bool:
    return v >= 0


@dataclass
class ServerConfig:
    model_name: str | None = _opt(
        None, "--model-name", "--model", "-m", env="MODEL_NAME", panel=MODEL,
        help="Hub id (from the local HF cache, see `tgis download-weights`) or model directory. "
             "Default: the built-in SmolLM2-135M-Instruct.")
    revision: str | None = _opt(None, "--revision", env="REVISION", panel=MODEL, help="Hub revision.")
    dtype: str | None = _opt(None, "--dtype", env="DTYPE", panel=MODEL,
                             help="Weights dtype (default: bfloat16/float16 on GPU, float32 on CPU).",
                             check=(lambda v: v in DTYPES, "Unrecognized data type: {value}"))
    dtype_str: str | None = _opt(None, "--dtype-str", env="DTYPE_STR", panel=MODEL, help="Alias of --dtype (TGIS).",
                                 check=(lambda v: v in DTYPES, "Unrecognized data type: {value}"))
    device: str | None = _opt(None, "--device", env="DEVICE", panel=MODEL,
                              help="torch device (default: cuda if available).")
    trust_remote_code: bool = _opt(False, "--trust-remote-code", env="TRUST_REMOTE_CODE", panel=MODEL,
                                   help="Allow model code from the model directory.")
    num_shard: int | None = _opt(None, "--num-shard", env="NUM_SHARD", panel=MODEL,
                                 help="Tensor-parallel ranks (TGIS).",
                                 check=(_positive, "`num_shard` / NUM_GPUS cannot be < 1"))
    num_gpus: int | None = _opt(None, "--num-gpus", env="NUM_GPUS", panel=MODEL,
                                help="Same as --num-shard; must agree with it.",
                                check=(_positive, "NUM_GPUS must be a positive integer"))
    cuda_process_memory_fraction: float = _opt(
        1.0, "--cuda-process-memory-fraction", "-c", env="CUDA_PROCESS_MEMORY_FRACTION", panel=MODEL,
        help="Share of GPU memory this process may allocate.",
        check=(_fraction, "cuda_process_memory_fraction must be in range 0 < x <= 1"))
    max_concurrent_requests: int = _opt(512, "--max-concurrent-requests", env="MAX_CONCURRENT_REQUESTS",
                                        panel=LIMITS, help="In-flight inputs before `Model is overloaded`.",
                                        check=(_positive, "max_concurrent_requests must be > 0"))
    max_sequence_length: int | None = _opt(
        None, "--max-sequence-length", env="MAX_SEQUENCE_LENGTH", panel=LIMITS,
        help="Input + output token limit (default: from the model config, else 2048).",
        check=(lambda v: v >= 2, "max_sequence_length ({value}) must be at least 2 (1 input + 1 output)"))
    max_new_tokens: int = _opt(1024, "--max-new-tokens", env="MAX_NEW_TOKENS", panel=LIMITS,
                               help="Server cap on max_new_tokens (lowered to max_sequence_length - 1).",
                               check=(_positive, "max_new_tokens ({value}) at least 1"))
    max_top_n_tokens: int = _opt(10, "--max-top-n-tokens", env="MAX_TOP_N_TOKENS", panel=LIMITS,
                                 help="Largest top_n_tokens a request may ask for (TGIS: no limit; the proto "
                                      "documents 5, vllm-tgis-adapter allows 10).",
                                 check=(_not_negative, "max_top_n_tokens ({value}) must be >= 0"))
    max_request_bytes: int = _opt(4 << 20, "--max-request-bytes", env="MAX_REQUEST_BYTES", panel=LIMITS,
                                  help="Largest gRPC request message, texts included (RESOURCE_EXHAUSTED beyond; "
                                       "4 MiB is gRPC's and TGIS' default).",
                                  check=(_positive, "max_request_bytes ({value}) must be at least 1"))
    max_batch_size: int = _opt(12, "--max-batch-size", env="MAX_BATCH_SIZE", panel=LIMITS,
                               help="Sequences per batch.",
                               check=(_positive, "max_batch_size ({value}) must be at least 1"))
    max_waiting_tokens: int = _opt(24, "--max-waiting-tokens", env="MAX_WAITING_TOKENS", panel=LIMITS,
                                   help="Decode steps before waiting requests are forced into the batch.",
                                   check=(_positive, "max_waiting_tokens ({value}) must be at least 1"))
    max_num_batched_tokens: int | None = _opt(
        None, "--max-num-batched-tokens", env="MAX_NUM_BATCHED_TOKENS", panel=LIMITS,
        help="Tokens computed per step: decodes first, then prompt chunks (default: 8192 on GPU, 512 on CPU).",
        check=(_positive, "max_num_batched_tokens ({value}) must be at least 1"))
    chunked_prefill: bool = _opt(True, "--chunked-prefill", env="ENABLE_CHUNKED_PREFILL", panel=LIMITS,
                                 help="Split long prompts over steps so running streams keep their pace (true/false).",
                                 explicit_bool=True)
    kv_cache_memory_fraction: float = _opt(
        0.9, "--kv-cache-memory-fraction", env="KV_CACHE_MEMORY_FRACTION", panel=LIMITS,
        help="Share of free device memory the KV cache may use.",
        check=(_fraction, "kv_cache_memory_fraction ({value}) must be in range 0 < x <= 1"))
    kv_cache_dtype: str = _opt("auto", "--kv-cache-dtype", env="KV_CACHE_DTYPE", panel=LIMITS,
                               help="auto (the model's dtype) or fp8 (float8 e4m3: twice the tokens in the same "
                                    "memory, half the bytes read per step; native engine).",
                               check=(lambda v: v in KV_CACHE_DTYPES, "kv_cache_dtype must be one of " +
                                      ", ".join(KV_CACHE_DTYPES) + ", not {value}"))
    kv_cache_tokens: int | None = _opt(None, "--kv-cache-tokens", env="KV_CACHE_TOKENS", panel=LIMITS,
                                       help="KV cache capacity in tokens (overrides the memory fraction).",
                                       check=(_positive, "kv_cache_tokens ({value}) must be at least 1"))
    prefix_caching: bool = _opt(True, "--prefix-caching", env="ENABLE_PREFIX_CACHING", panel=LIMITS,
                                help="Reuse the KV cache of identical prompt prefixes (true/false).",
                                explicit_bool=True)
    engine: str = _opt("auto", "--engine", panel=ENGINE,
                       help="auto (native where it serves the architecture, else transformers), native, transformers. "
                            "DEPLOYMENT_FRAMEWORK=tgis_native|hf_custom_tp|hf_transformers|ds_inference (TGIS) "
                            "selects one too.",
                       check=(lambda v: v in ENGINES, "engine must be one of " + ", ".join(ENGINES) + ", not {value}"))
    deployment_framework: str | None = _opt(
        None, "--deployment-framework", env="DEPLOYMENT_FRAMEWORK", panel=ENGINE,
        help="TGIS engine name (see --engine).",
        check=(lambda v: v in FRAMEWORKS, "deployment_framework must be one of " + ", ".join(FRAMEWORKS) +
               ", not {value}"))
    tensor_parallel_method: str = _opt(
        "auto", "--tensor-parallel-method", env="TENSOR_PARALLEL_METHOD", panel=ENGINE,
        help="How --num-gpus ranks split the model: auto (our own split rules where they exist, else DeepSpeed "
             "AutoTP), rules, deepspeed (transformers engine; DEPLOYMENT_FRAMEWORK=ds_inference selects it too).",
        check=(lambda v: v in TP_METHODS, "tensor_parallel_method must be one of " + ", ".join(TP_METHODS) +
               ", not {value}"))
    cuda_graphs: bool = _opt(True, "--cuda-graphs", env="CUDA_GRAPHS", panel=ENGINE,
                             help="Capture decode steps in CUDA graphs (native engine, true/false).",
                             explicit_bool=True)
    async_scheduling: bool | None = _opt(
        None, "--async-scheduling", env="ASYNC_SCHEDULING", panel=ENGINE,
        help="Plan and launch each step while the GPU still runs the one before (native engine, one process; "
             "true/false; default: on GPUs).", explicit_bool=True)
    load_format: str = _opt("auto", "--load-format", env="LOAD_FORMAT", panel=ENGINE,
                            help="auto (the checkpoint's weights) or dummy (random weights of the model's shape, "
                                 "for benchmarks).",
                            check=(lambda v: v in ("auto", "dummy"), "load_format must be auto or dummy, not {value}"))
    pt2_compile: bool | None = _opt(None, "--pt2-compile", env="PT2_COMPILE", panel=ENGINE,
                                    help="torch.compile the native model (TGIS PT2_COMPILE, true/false; default: "
                                         "on GPUs).", explicit_bool=True)
    prefix_store_path: str | None = _opt(None, "--prefix-store-path", "--adapter-cache",
                                         env=("PREFIX_STORE_PATH", "ADAPTER_CACHE"), panel=ADAPTERS,
                                         help="Directory of adapters, one per id: prompt prefixes (decoder.pt, "
                                              "encoder.pt, PEFT prompt tuning) and PEFT LoRA adapters (enables "
                                              "prefix_id / adapter_id).")
    max_prompt_prefix_length: int | None = _opt(
        None, "--max-prompt-prefix-length", env="MAX_PROMPT_PREFIX_LENGTH", panel=ADAPTERS,
        help="Most virtual tokens in a prefix (default: half of max_sequence_length, rounded up).",
        check=(_positive, "Invalid value for MAX_PROMPT_PREFIX_LENGTH"))
    prompt_cache_size_mb: int = _opt(512, "--prompt-cache-size-mb", env="PROMPT_CACHE_SIZE_MB", panel=ADAPTERS,
                                     help="Memory for loaded prefixes (least recently used evicted).",
                                     check=(_positive, "prompt_cache_size_mb ({value}) must be at least 1"))
    output_special_tokens: bool = _opt(False, "--output-special-tokens", env="OUTPUT_SPECIAL_TOKENS", panel=OUTPUT,
                                       help="Keep special tokens (except a final EOS) in output text.")
    default_include_stop_seqs: bool = _opt(True, "--default-include-stop-seqs", env="DEFAULT_INCLUDE_STOP_SEQS",
                                           panel=OUTPUT, help="Default of include_stop_sequence (true/false).",
                                           explicit_bool=True)
    host: str = _opt("0.0.0.0", "--host", env="HOST", panel=NETWORK, help="Address both listeners bind to.")
    port: int = _opt(3000, "--port", "-p", env="PORT", panel=NETWORK,
                     help="HTTP port of /health, /metrics and the OpenAI API (/v1).",
                     check=(_port, "port ({value}) must be in 1..65535"))
    grpc_port: int = _opt(8033, "--grpc-port", "-g", env="GRPC_PORT", panel=NETWORK,
                          help="gRPC port (fmaas.GenerationService).",
                          check=(_port, "grpc_port ({value}) must be in 1..65535"))
    tls_cert_path: str | None = _opt(None, "--tls-cert-path", env="TLS_CERT_PATH", panel=NETWORK,
                                     help="Server certificate (PEM).")
    tls_key_path: str | None = _opt(None, "--tls-key-path", env="TLS_KEY_PATH", panel=NETWORK,
                                    help="Server private key (PEM).")
    tls_client_ca_cert_path: str | None = _opt(None, "--tls-client-ca-cert-path", env="TLS_CLIENT_CA_CERT_PATH",
                                               panel=NETWORK, help="CA for client certificates: enables mutual TLS.")
    tokenization_workers: int | None = _opt(
        None, "--tokenization-workers", env="TOKENIZATION_WORKERS", panel=PROCESS,
        help="Threads that tokenize requests beside the event loop (default, as TGIS: cores - shards, 1 to 8).",
        check=(_positive, "tokenization_workers must be > 0"))
    json_output: bool = _opt(False, "--json-output", env="JSON_OUTPUT", panel=PROCESS, help="Log JSON lines.")
    termination_log_path: str = _opt("/dev/termination-log", "--termination-log-path", env="TERMINATION_LOG_PATH",
                                     panel=PROCESS, help="Where a fatal start-up error is written (when writable).")
    shutdown_grace_period: float = _opt(30.0, "--shutdown-grace-period", env="SHUTDOWN_GRACE_PERIOD", panel=PROCESS,
                                        help="Seconds in-flight requests get to finish after SIGTERM/SIGINT.",
                                        check=(lambda v: v >= 0, "shutdown_grace_period ({value}) must be >= 0"))

    def validate(self) -> None:
        """Raise ConfigError on the first bad value (single options first, then combinations, as TGIS)."""
        for f in fields(self):
            value, check = getattr(self, f.name), f.metadata["check"]
            if value is not None and check is not None and not check[0](value):
                raise ConfigError(check[1].format(value=value))
        if self.dtype and self.dtype_str and self.dtype != self.dtype_str:
            raise ConfigError("dtype and dtype_str args both provided with different values")
        if self.num_shard and self.num_gpus and self.num_shard != self.num_gpus:
            raise ConfigError(f"NUM_GPUS and num_shard are set to different values ({self.num_gpus} and "
                              f"{self.num_shard})")
        if bool(self.tls_cert_path) != bool(self.tls_key_path):
            raise ConfigError("tls: must provide both cert and key")
        if self.tls_client_ca_cert_path and not self.tls_cert_path:
            raise ConfigError("tls: cannot provide client ca cert without keypair")

    @property
    def effective_dtype(self) -> str | None:
        return self.dtype or self.dtype_str

    @property
    def effective_engine(self) -> str:
        """An explicit --engine wins; else TGIS' DEPLOYMENT_FRAMEWORK; else auto."""
        if self.engine == "auto" and self.deployment_framework:
            return FRAMEWORKS[self.deployment_framework]
        return self.engine

    @property
    def effective_tensor_parallel_method(self) -> str:
        """An explicit --tensor-parallel-method wins; else DeepSpeed under DEPLOYMENT_FRAMEWORK=ds_inference."""
        if self.tensor_parallel_method == "auto" and self.deployment_framework == "ds_inference":
            return "deepspeed"
        return self.tensor_parallel_method

    @property
    def world_size(self) -> int:
        """Explicit --num-shard / NUM_GPUS only: one process serves one device, so visible-device lists (which
        TGIS counts, spec §4.2) must not make a plain start fail."""
        return self.num_shard or self.num_gpus or 1


def option_fields() -> list[tuple[str, type, Any, dict]]:
    """(name, base type, default, metadata) per option, with `X | None` unwrapped to X."""
    hints = typing.get_type_hints(ServerConfig)
    out = []
    for f in fields(ServerConfig):
        base = hints[f.name]
        args = [a for a in typing.get_args(base) if a is not type(None)]
        out.append((f.name, args[0] if args else base, f.default, dict(f.metadata)))
    return out


def parse_bool(value: str | bool) -> bool:
    """TGIS/clap boolean values: true/false, 1/0, yes/no, on/off (case-insensitive)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on", "t", "y"):
        return True
    if text in ("false", "0", "no", "off", "f", "n"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false)")


def check_engine_options(model_dir: Path, dtype: str | None, device: str | None, world_size: int,
                         tensor_parallel_method: str = "auto") -> None:
    """What would otherwise fail only inside the model load, minutes later and as a traceback: the dtype, the
    device (CUDA present, enough GPUs) and whether the model splits into `world_size` tensor-parallel ranks."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"Unrecognized data type: {dtype} (use one of {', '.join(DTYPES)})")
    import torch

    try:
        kind = torch.device(device).type if device else "cuda" if torch.cuda.is_available() else "cpu"
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device '{device}': use cpu, cuda or cuda:N") from exc
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device} requested but CUDA is not available to this torch "
                              f"({torch.__version__}): use --device cpu")
        index = torch.device(device).index if device else None
        if index is not None and index >= count:
            raise ConfigError(f"device {device} requested but only {count} GPU(s) are visible")
        if world_size > count:
            raise ConfigError(f"{world_size} shards configured but only {count} GPUs detected")
    _check_split(model_dir, world_size, tensor_parallel_method)


def _check_split(model_dir: Path, world_size: int, method: str) -> None:
    from runtime.parallel.deepspeed import split_method
    from runtime.parallel.rules import ShardingError, UnsupportedModel
    from runtime.parallel.sharding import read_manifest

    manifest = read_manifest(model_dir)
    if manifest is not None and manifest["world_size"] != world_size:
        raise ConfigError(f"{model_dir} was split for {manifest['world_size']} ranks by `tgis shard`: serve it with "
                          f"--num-gpus {manifest['world_size']}")
    if world_size == 1:
        return
    config = json.loads((Path(model_dir) / "config.json").read_text())
    try:
        split_method(config, method, world_size, presplit=manifest is not None)
    except UnsupportedModel as exc:  # the architecture, at any --num-gpus: the message says what instead
        raise ConfigError(str(exc)) from exc
    except (ShardingError, KeyError) as exc:
        raise ConfigError(f"the model cannot be split into {world_size} tensor-parallel ranks: {exc}; choose "
                          "another --num-gpus") from exc

"""DeepSpeed AutoTP: tensor parallelism for the architectures our own split rules (runtime.parallel.rules) lack.

Why it fits in without a second code path: every rank loads the whole transformers model on the CPU, as for our own
rules, and `deepspeed.init_inference` only swaps its Linear layers for column-parallel and row-parallel ones (an
all-reduce after each row-parallel layer and after the LM head, so every rank has the full logits) in the process
group the executor already made. The runner, its KV cache (each rank holds its own heads), the step protocol,
sampling on rank 0 and failure handling stay the ones of runtime.parallel.executor.

What it may split is an allow-list (TESTED): the architectures whose 2-rank results tests/test_deepspeed.py checks
against one process. Measured failures (BROKEN, and Falcon's original layout) are refused at start with the reason,
before any rank is spawned, instead of a crash or a hang in the first collective.

All-reduce: DeepSpeed's CPU shared-memory op is never built. It compiles with g++/ninja for minutes at the first
start, segfaults unless LOCAL_SIZE equals the world size, and leaves ~69 MB per rank in /dev/shm; without it
DeepSpeed all-reduces through torch.distributed (gloo on CPU, as our own rules do; NCCL on GPUs either way), with
identical results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from runtime.parallel.rules import FAMILY, ShardingError, UnsupportedModel, dims, plan

log = logging.getLogger(__name__)

TESTED = ("opt", "gptj", "falcon", "phi", "starcoder2", "llama")  # model_type values tests/test_deepspeed.py covers
_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "dbrx", "deepseek_v2", "deepseek_v3", "olmoe", "granitemoe")
BROKEN = {
    "bloom": "DeepSpeed AutoTP breaks its ALiBi attention (shape mismatch, DeepSpeed issue #7239)",
    "phi3": "DeepSpeed AutoTP fails on its fused qkv and gate-up projections",
    "gpt2": "DeepSpeed AutoTP cannot split its fused c_attn projection",
    "gpt_bigcode": "DeepSpeed AutoTP cannot split its fused c_attn projection",
    **dict.fromkeys(_MOE, "DeepSpeed AutoTP would leave its experts unsplit on every rank"),
}


def _broken(config: dict) -> str | None:
    if config.get("model_type") == "falcon" and not config.get("new_decoder_architecture"):
        return "DeepSpeed AutoTP fails on Falcon's original attention layout (new_decoder_architecture false, " \
               "as Falcon-7B)"
    if config.get("model_type") == "falcon" and config.get("alibi"):
        return "DeepSpeed AutoTP is not tested with Falcon's ALiBi attention"
    return BROKEN.get(config.get("model_type"))


def _instead(model_type: str | None) -> str:
    if model_type in FAMILY:
        return "our own split rules serve it (tensor-parallel method auto, without DEPLOYMENT_FRAMEWORK=ds_inference)"
    return "serve it unsplit (--num-gpus 1)"


def split_method(config: dict, requested: str, world_size: int, presplit: bool = False) -> str:
    """"rules" or "deepspeed": how `world_size` ranks split the model of `config` (a config.json; `presplit`: a
    `tgis shard` directory) when `requested` (one of runtime.engine.config.TP_METHODS). Raises UnsupportedModel,
    naming the architecture and what works instead, when no method can; ShardingError when the head counts do not
    allow `world_size` ranks."""
    model_type = config.get("model_type")
    if requested == "rules" or (requested == "auto" and model_type in FAMILY):
        plan(config, world_size, config.get("vocab_size") or world_size)
        return "rules"
    if presplit:
        raise UnsupportedModel("this directory was split by `tgis shard` (our own rules): DeepSpeed tensor "
                               "parallelism splits the original checkpoint")
    reason = _broken(config)
    if reason:
        raise UnsupportedModel(f"tensor parallelism cannot split {model_type!r} models: {reason}; "
                               f"{_instead(model_type)}")
    if model_type not in TESTED:
        ours = ", ".join(sorted(FAMILY)) + " (own split rules), " if requested == "auto" else ""
        theirs = [t for t in TESTED if requested != "auto" or t not in FAMILY]
        raise UnsupportedModel(f"tensor parallelism supports {ours}{', '.join(theirs)} (DeepSpeed AutoTP) models, "
                               f"not {model_type!r}: {_instead(model_type)}")
    d = dims(config)
    kv_key = "num_kv_heads" if config.get("num_kv_heads") else "num_key_value_heads"  # Falcon's name
    for key, value in (("num_attention_heads", d.heads), (kv_key, config.get("num_kv_heads") or d.kv_heads)):
        if value < world_size:
            raise ShardingError(f"{key} ({value}) is smaller than the number of shards ({world_size})")
    if importlib.util.find_spec("deepspeed") is None:
        raise UnsupportedModel(f"splitting {model_type!r} models needs DeepSpeed: pip install 'tgis[deepspeed]'")
    return "deepspeed"


class _WorldGroup:
    """DeepSpeed's model-parallel unit (`mpu`): the whole default process group. Without it DeepSpeed creates a
    group of its own once per process and reuses it, destroyed, for the next sharded engine (tests start several)."""

    @staticmethod
    def get_model_parallel_group():
        return dist.group.WORLD


def autotp(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """This rank's part of `model` (whole, on the CPU), split by DeepSpeed AutoTP over the default process group
    and moved to `device`."""
    os.environ["DS_ACCELERATOR"] = device.type  # else it picks CUDA whenever a GPU is visible
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != device.type:
        raise ShardingError(f"DeepSpeed already runs on {get_accelerator().device_name()} in this process, not "
                            f"{device.type}")
    # (`deepspeed.comm.torch` is also the name of the torch module that deepspeed.comm re-exports)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # see the module docstring: gloo all-reduce
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    group = {"tp_size": dist.get_world_size(), "tp_group": dist.group.WORLD, "mpu": _WorldGroup()}
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # it prints its layer map
        engine = deepspeed.init_inference(model, tensor_parallel=group, dtype=dtype, replace_with_kernel_inject=False)
    log.info("DeepSpeed %s %s", deepspeed.__version__, printed.getvalue().strip())
    return engine.module

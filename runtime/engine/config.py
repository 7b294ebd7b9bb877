"""Engine configuration: the knobs the scheduler, KV-cache manager and model runner read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model_path: str
    dtype: str | None = None  # None: float16/bfloat16 on GPU, float32 on CPU
    device: str | None = None  # None: cuda if available, else cpu
    max_sequence_length: int | None = None  # None: from the model config (spec §4.3), else 2048
    max_batch_size: int = 12
    max_waiting_tokens: int = 24  # decode steps a waiting request may wait before forcing a join (spec §2.4)
    max_prefill_tokens: int = 4096  # per-step prefill token budget (padded tokens)
    kv_cache_tokens: int | None = None  # KV capacity in (padded) token slots; None: sized from memory
    kv_cache_memory_fraction: float = 0.9  # of free device memory (GPU) / available RAM share (CPU)
    max_queue_jump_s: float = 1.0  # FIFO with a bounded queue jump (spec §2.3)
    output_special_tokens: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1  # ranks (processes) the model is split across
    cuda_memory_fraction: float = 1.0  # per-process cap (TGIS CUDA_PROCESS_MEMORY_FRACTION), set where the model runs

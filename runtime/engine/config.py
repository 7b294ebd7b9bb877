"""Engine configuration: the knobs the scheduler, KV-cache manager and model runners read."""

from __future__ import annotations

from dataclasses import dataclass

ENGINES = ("auto", "native", "transformers")
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype; fp8: float8 e4m3 (native engine)
TP_METHODS = ("auto", "rules", "deepspeed")  # how ranks split a model: our own rules, DeepSpeed AutoTP


@dataclass
class EngineConfig:
    model_path: str
    dtype: str | None = None  # None: float16/bfloat16 on GPU, float32 on CPU
    device: str | None = None  # None: cuda if available, else cpu
    engine: str = "auto"  # auto: the native runner for the architectures it has, transformers for the rest
    max_sequence_length: int | None = None  # None: from the model config (spec §4.3), else 2048
    max_batch_size: int = 12
    max_waiting_tokens: int = 24  # steps a waiting request may wait before forcing a join (spec §2.4)
    max_num_batched_tokens: int | None = None  # per-step token budget; None: 8192 on GPU, 512 on CPU
    chunked_prefill: bool = True  # split long prompts over steps (native runner; the padded one prefills whole)
    block_size: int = 16  # tokens per paged KV block
    kv_cache_tokens: int | None = None  # KV capacity in tokens; None: sized from memory
    kv_cache_memory_fraction: float = 0.9  # of free device memory (GPU) / available RAM share (CPU)
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES
    prefix_caching: bool = True  # reuse computed KV blocks of identical prompt prefixes (native runner)
    max_queue_jump_s: float = 1.0  # FIFO with a bounded queue jump (spec §2.3)
    max_loras: int = 8  # distinct LoRA adapters in one batch
    output_special_tokens: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1  # ranks (processes) the model is split across
    # auto: our own split rules (runtime.parallel.rules) where they exist, else DeepSpeed AutoTP; "deepspeed" forces
    # AutoTP, and with it the transformers engine (TGIS' DEPLOYMENT_FRAMEWORK=ds_inference)
    tensor_parallel_method: str = "auto"
    cuda_memory_fraction: float = 1.0  # per-process cap (TGIS CUDA_PROCESS_MEMORY_FRACTION), set where the model runs
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (native runner on CUDA)
    # plan and launch step N+1 while step N runs (native runner in one process); None: on CUDA
    async_scheduling: bool | None = None
    compile: bool | None = None  # torch.compile the native model (TGIS PT2_COMPILE); None: on CUDA only
    onednn: bool = True  # CPU: projections through oneDNN-packed weights (native runner); False: F.linear (A/B)
    # auto: triton on CUDA, cpu (torch with decode rows through a C++ kernel) on the CPU; torch: plain torch only
    attention_backend: str = "auto"
    load_format: str = "auto"  # "dummy": random weights of the configured shape (benchmarks)
    debug_checks: bool = False  # verify KV block invariants after every step (tests)

    def token_budget(self, device_type: str) -> int:
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return 8192 if device_type == "cuda" else 512

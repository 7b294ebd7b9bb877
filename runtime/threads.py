"""How many CPU cores this process really has, and how the engine and the front end share them.

torch sizes its intra-op pool from the machine's cores, but an affinity mask or a container's CPU quota may leave
the process fewer, and `tgis serve` runs its front end (event loop, tokenization) beside the engine. Oversubscribed,
OpenMP's spinning threads and the front end steal each other's time slices: on 2 cores a token through the server
took 5x its in-process time (471-511 ms against 92-97 ms; 92-97 ms again with one engine thread). OMP_NUM_THREADS,
when set, is the operator's choice and wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from runtime.allocator import keep_freed_memory

FRONT_END_CORES = 1  # left to the server process's event loop and tokenization workers
MAX_TOKENIZATION_WORKERS = 8  # TGIS' router: clamp(num_cpus - num_shards, 1, 8)


def available_cores() -> int:
    """CPUs in this process's affinity mask, capped by a cgroup CPU quota when one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota)) if quota else cores


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole CPUs granted by cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`, rounded up; None when unlimited."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else math.ceil(int(quota) / int(period))
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def engine_threads(world_size: int = 1) -> int:
    """torch intra-op threads for each of `world_size` engine ranks: OMP_NUM_THREADS when set, else the cores left
    after the front end's share, divided among the ranks (at least 1)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, (available_cores() - FRONT_END_CORES) // world_size)


def claim_engine_cores(world_size: int = 1) -> int:
    """Set up this process (or thread's process) to run an engine rank on the CPU: torch's intra-op pool sized by
    `engine_threads`, and glibc malloc kept from returning freed activations to the kernel between steps
    (runtime/allocator.py). Returns the thread count."""
    threads = engine_threads(world_size)
    torch.set_num_threads(threads)
    keep_freed_memory()
    return threads


def tokenization_workers(world_size: int = 1) -> int:
    """TGIS' default for the router's tokenization pool."""
    return min(MAX_TOKENIZATION_WORKERS, max(1, available_cores() - world_size))

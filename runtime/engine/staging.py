"""Host lists onto the device without making the host wait for the device.

A copy from pageable host memory synchronises the CUDA stream: the host then waits for every kernel queued before
it. The engine plans and launches the next step while the GPU still runs the current one (async scheduling), so
every per-step host-to-device copy goes through pinned memory (PyTorch's caching host allocator keeps a pinned
block until the copy that reads it has run) and returns at once.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` as a tensor on `device`, queued on the current stream without waiting for it."""
    cuda = torch.device(device).type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=cuda).to(device, non_blocking=True)

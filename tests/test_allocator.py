"""glibc malloc tuning (runtime/allocator.py): a step's freed activations are reused without new page faults."""

from __future__ import annotations

import resource

import torch

from runtime.allocator import keep_freed_memory


def _step(x: torch.Tensor, w: torch.Tensor) -> float:
    """A prompt step's allocation pattern in miniature: megabyte activations between small Python objects."""
    h = x @ w.T
    g = torch.nn.functional.silu(h) * h
    _names = [str(i) for i in range(200)]
    return float((g @ w).sum())


def test_steps_reuse_freed_activations_without_page_faults():
    assert keep_freed_memory()  # these machines run glibc
    x, w = torch.randn(512, 576), torch.randn(1536, 576)  # activations of 3 MiB, as SmolLM2's 512-token prompt
    for _ in range(8):  # the heap grows to the steps' peak once
        _step(x, w)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        _step(x, w)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 100  # untuned: ~740 per step

"""Programmatic dependent launch (Hopper and later) for the Triton kernels of a decode step.

Why: at batch 1 a layer is five kernels of 5-55 µs back to back (four GEMVs and the attention kernel); between two
of them the GPU drains the first and then launches and ramps up the second, 160 times a step. A kernel launched with
PDL may be scheduled while the one before is finishing: its programs become resident and block in
`griddepcontrol.wait` until the kernel before has completed and its writes are visible. Every kernel that takes
part waits first, before it reads anything a kernel before it may write, so the order of results never depends on
timing; CUDA graphs capture the launches with their programmatic edges. Kernels launched without PDL (torch's, or
any on a GPU before Hopper) ignore the instructions.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ENABLED = True  # scripts/gpu_native.py's A/B switch


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def usable(t: torch.Tensor) -> bool:
    """Launch with PDL: a CUDA tensor on a Hopper-or-later GPU (the interpreter on the CPU has no such launch)."""
    return ENABLED and t.is_cuda and _hopper(t.device.index or 0)


@triton.jit
def wait(GDC: tl.constexpr):
    """Block until the kernel before has completed and its writes are visible."""
    if GDC:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release(GDC: tl.constexpr):
    """Let the next kernel's programs be scheduled: called once a program's reads are done, not at its start (an H200
    run with the release first thing was 4 % slower at batch 1: the next kernel's programs, resident early, piled
    onto the SMs that freed first)."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()

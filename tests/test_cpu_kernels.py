"""The CPU's C++ kernel library (runtime/models/native/cpu_kernels.py) and its RMSNorm against transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from runtime.models.native import cpu_kernels
from runtime.models.native.layers import RMSNorm


def test_the_kernels_build_here():
    """The machines this project runs on have g++: the kernels must really be in use, not silently skipped."""
    assert cpu_kernels.library() is not None


def _norms(dtype: torch.dtype, size: int) -> tuple[RMSNorm, LlamaRMSNorm]:
    ours, theirs = RMSNorm(size, 1e-5), LlamaRMSNorm(size, eps=1e-5)
    weight = (torch.randn(size, generator=torch.Generator().manual_seed(size)) * 0.1 + 1).to(dtype)
    ours.weight.data, theirs.weight.data = weight.clone(), weight.clone()
    return ours, theirs


@pytest.mark.parametrize("rows, size", [(1, 576), (16, 576), (37, 72), (3, 8)])  # 72, 8: a partial vector
def test_rms_norm_is_transformers_rms_norm(rows, size):
    """bfloat16 bit for bit; float32 within a rounding of the mean's summation order."""
    x = torch.randn(rows, size, generator=torch.Generator().manual_seed(rows))
    for dtype in (torch.bfloat16, torch.float32):
        ours, theirs = _norms(dtype, size)
        got, want = cpu_kernels.rms_norm(x.to(dtype), ours.weight, ours.eps), theirs(x.to(dtype))
        assert got is not None and got.dtype == dtype
        if dtype == torch.bfloat16:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(ours(x.to(dtype)), got)  # the module takes the kernel


def test_rms_norm_of_a_strided_view_takes_the_torch_path():
    """Qwen3's q/k norms see views of the fused projection: not the kernel's layout, transformers' numbers."""
    ours, theirs = _norms(torch.float32, 64)
    view = torch.randn(5, 3, 128)[:, :, :64]
    assert cpu_kernels.rms_norm(view, ours.weight, ours.eps) is None
    assert torch.equal(ours(view), theirs(view))

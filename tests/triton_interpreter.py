"""Run the Triton kernels on the CPU: Triton's interpreter (TRITON_INTERPRET=1), patched twice.

- Triton 3.6's interpreter keeps scalars as 1-element arrays and turns them into loop bounds with `int(array)`,
  which numpy 2.4 refuses for arrays that are not 0-dimensional; the patch reads the element instead.
- Its float-to-float8 conversion rounds half up within the mantissa and drops the carry into the exponent (1.97
  becomes 1.0, not 2.0), and float32 to bfloat16 truncates; the GPU rounds both to nearest even. The patch converts
  to float8 e4m3 and to bfloat16 through torch, which rounds as the GPU does.
The variable must be set before any kernel module is imported (`triton.jit` reads it at decoration)."""

from __future__ import annotations

import os

import numpy as np
import torch


def enable() -> bool:
    """True when Triton is installed (kernels then run interpreted on the CPU)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return False
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    if getattr(original, "__name__", "") != "patched":
        interpreter._patch_lang_tensor = patched
        _round_to_nearest_even(interpreter)
    return True


def _round_to_nearest_even(interpreter) -> None:
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    to_fp, trunc = builder.create_fp_to_fp, builder.create_fp_trunc

    def wide(src) -> torch.Tensor:
        data = src.data if src.dtype.scalar == tl.float32 else interpreter._convert_float(
            src.data, src.dtype.scalar, tl.float32, None).view(np.float32)
        return torch.from_numpy(np.ascontiguousarray(data))

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar != tl.float8e4nv:
            return to_fp(self, src, dst_type, rounding_mode)
        data = wide(src).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return interpreter.TensorHandle(data, dst_type.scalar)

    def create_fp_trunc(self, src, dst_type):
        if dst_type.scalar != tl.bfloat16:
            return trunc(self, src, dst_type)
        data = wide(src).to(torch.bfloat16).view(torch.uint16).numpy()
        return interpreter.TensorHandle(data, dst_type.scalar)

    builder.create_fp_to_fp = create_fp_to_fp
    builder.create_fp_trunc = create_fp_trunc

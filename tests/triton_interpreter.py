"""Run the Triton kernels on the CPU: Triton's interpreter (TRITON_INTERPRET=1), patched for numpy >= 2.4.

Triton 3.6's interpreter keeps scalars as 1-element arrays and turns them into loop bounds with `int(array)`, which
numpy 2.4 refuses for arrays that are not 0-dimensional; the patch reads the element instead. The variable must be
set before any kernel module is imported (`triton.jit` reads it at decoration)."""

from __future__ import annotations

import os


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
    return True

"""The CPU's C++ kernels (csrc/): one library built on first use with the system's g++ for this machine's vector
units (-march=native), cached under tgis' cache directory by a hash of its sources, flags and the CPU's feature
flags, called through ctypes. Without a compiler, or where the build fails, every caller keeps its plain-torch path
(logged once).

Attention (cpu_attention.py) takes most of them; the RMSNorm here serves every norm of the native model: in torch a
norm is eight operators (two dtype conversions among them), ~38 µs for 16 rows of SmolLM2 in bfloat16 against 6 µs
in one pass, 61 norms per step.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from runtime.default_model import tgis_cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("paged_decode.cpp", "paged_prompt.cpp", "rotary_cache.cpp", "rms_norm.cpp")]
HEADERS = [CSRC / "vec.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the element types every kernel has


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                    "")
    except OSError:
        return ""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot be."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.info("no C++ compiler: the CPU kernels stay on their plain-torch paths")
        return None
    key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in SOURCES + HEADERS),
                                      " ".join([compiler, *FLAGS]).encode(), _cpu_flags().encode()])).hexdigest()[:16]
    path = tgis_cache_dir() / "kernels" / f"tgis-cpu-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # concurrent builders: last rename wins
                built = Path(tmp) / path.name
                subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(built, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        log.warning("building the CPU kernels failed, using the plain-torch paths: %s", detail)
        return None
    for suffix in SUFFIXES.values():
        for kernel, pointers in (("decode", 5), ("prompt", 6)):
            fn = getattr(lib, f"{kernel}_{suffix}")
            fn.argtypes = ([ctypes.c_void_p] * pointers + [ctypes.c_int64] * 7
                           + [ctypes.c_float, ctypes.c_int64, ctypes.c_int])
            fn.restype = None
        fn = getattr(lib, f"rotary_cache_{suffix}")
        fn.argtypes, fn.restype = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 9, None
        fn = getattr(lib, f"rms_norm_{suffix}")
        fn.argtypes, fn.restype = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float], None
    lib.supported_dim.argtypes, lib.supported_dim.restype = [ctypes.c_int64], ctypes.c_int
    return lib


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """transformers' RMSNorm of x's rows in one pass; None where the kernel does not serve these tensors (then
    the caller computes it in torch)."""
    if (x.device.type != "cpu" or x.dtype not in SUFFIXES or weight.dtype != x.dtype or not x.is_contiguous()
            or not weight.is_contiguous() or x.shape[-1] != weight.shape[0] or (lib := library()) is None):
        return None
    out = torch.empty_like(x)
    n = weight.shape[0]
    getattr(lib, f"rms_norm_{SUFFIXES[x.dtype]}")(out.data_ptr(), x.data_ptr(), weight.data_ptr(), x.numel() // n, n,
                                                  eps)
    return out

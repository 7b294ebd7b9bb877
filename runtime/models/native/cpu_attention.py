"""Decode attention on the CPU through a small C++ kernel (csrc/paged_decode.cpp) that reads the paged cache in
place.

The plain-torch path gathers each decode row's blocks into a padded tensor and runs scaled_dot_product_attention,
whose CPU kernel is built for many query rows: with a decode row's few (one per query head of a KV group) it
reached 4-7 GB/s, and the gather copied every cached key and value once more (SmolLM2-135M, bfloat16, 16 rows of
~400 positions, one thread: ~1.3 ms per layer, 40 % of a decode step). The kernel is compiled on first use with the
system's g++ for this machine's vector units (-march=native) and cached under tgis' cache directory by a hash of
its source, flags and the CPU's feature flags; without a compiler, or where the build fails, decode rows keep the
plain-torch path (logged once). Prompt rows always do: there, many query rows keep the torch kernel efficient.
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
from runtime.models.native.attention import TorchAttention

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
LANES = 16  # the kernel's chunk of positions: block_size must be a multiple of it
_FUNCTIONS = {torch.float32: "decode_f32", torch.bfloat16: "decode_bf16"}


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                    "")
    except OSError:
        return ""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.info("no C++ compiler: CPU decode attention stays on the plain-torch path")
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join([compiler, *FLAGS]).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    path = tgis_cache_dir() / "kernels" / f"paged_decode-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # concurrent builders: last rename wins
                built = Path(tmp) / path.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(built, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        log.warning("building the CPU decode attention kernel failed, using the plain-torch path: %s", detail)
        return None
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int64, ctypes.c_int]
        fn.restype = None
    lib.supported_dim.argtypes, lib.supported_dim.restype = [ctypes.c_int64], ctypes.c_int
    return lib


class CpuAttention(TorchAttention):
    """TorchAttention with decode rows through the C++ kernel where it applies (float32 or bfloat16 cache in the
    queries' dtype, a head size the kernel is compiled for, block_size a multiple of 16)."""

    def decode(self, q, cache, meta, scale, window, out) -> None:
        lib = library()
        kv_heads, dim = cache.shape[-2:]
        if (lib is None or q.dtype not in _FUNCTIONS or cache.dtype != q.dtype or not lib.supported_dim(dim)
                or cache.shape[2] % LANES or q.shape[1] % kv_heads or meta.block_tables.dtype != torch.int32):
            return super().decode(q, cache, meta, scale, window, out)
        d = meta.num_decodes
        q, tables, lens = q[:d].contiguous(), meta.block_tables[:d].contiguous(), meta.seq_lens[:d].contiguous()
        getattr(lib, _FUNCTIONS[q.dtype])(out.data_ptr(), q.data_ptr(), cache.data_ptr(), tables.data_ptr(),
                                          lens.data_ptr(), d, q.shape[1], kv_heads, dim, cache.shape[1],
                                          cache.shape[2], tables.shape[1], scale, window or 0,
                                          torch.get_num_threads())

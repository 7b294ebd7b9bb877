"""Attention on the CPU through small C++ kernels that read the paged cache in place: decode rows
(csrc/paged_decode.cpp) and prompt chunks (csrc/paged_prompt.cpp).

The plain-torch path gathers each decode row's blocks into a padded tensor and runs scaled_dot_product_attention,
whose CPU kernel is built for many query rows: with a decode row's few (one per query head of a KV group) it
reached 4-7 GB/s, and the gather copied every cached key and value once more (SmolLM2-135M, bfloat16, 16 rows of
~400 positions, one thread: ~1.3 ms per layer, 40 % of a decode step). The kernel is compiled on first use with the
system's g++ for this machine's vector units (-march=native) and cached under tgis' cache directory by a hash of
its source, flags and the CPU's feature flags; without a compiler, or where the build fails, every row keeps the
plain-torch path (logged once).

Prompt chunks: scaled_dot_product_attention with the explicit mask a chunk needs (its cached context before it)
computes every masked score too; with SmolLM2's 9 query heads over 3 KV heads a 512-token prompt took 7.3 ms per
layer in bfloat16 (83 GFLOP/s), ~40 % of the prompt's step. The prompt kernel skips the blocks above the diagonal
and shares each key and value load among 8 query rows.
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

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "paged_decode.cpp", CSRC / "paged_prompt.cpp"]
HEADERS = [CSRC / "vec.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
LANES = 16  # the kernel's chunk of positions: block_size must be a multiple of it
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}


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
        log.info("no C++ compiler: CPU attention stays on the plain-torch path")
        return None
    key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in SOURCES + HEADERS),
                                      " ".join([compiler, *FLAGS]).encode(), _cpu_flags().encode()])).hexdigest()[:16]
    path = tgis_cache_dir() / "kernels" / f"paged_attention-{key}.so"
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
        log.warning("building the CPU attention kernels failed, using the plain-torch path: %s", detail)
        return None
    for suffix in SUFFIXES.values():
        for kernel, pointers in (("decode", 5), ("prompt", 6)):
            fn = getattr(lib, f"{kernel}_{suffix}")
            fn.argtypes = ([ctypes.c_void_p] * pointers + [ctypes.c_int64] * 7
                           + [ctypes.c_float, ctypes.c_int64, ctypes.c_int])
            fn.restype = None
    lib.supported_dim.argtypes, lib.supported_dim.restype = [ctypes.c_int64], ctypes.c_int
    return lib


def _applies(q: torch.Tensor, cache: torch.Tensor, meta) -> ctypes.CDLL | None:
    """The kernels' library where they serve this layer: a float32 or bfloat16 cache in the queries' dtype, a head
    size they are compiled for, whole KV-head groups, int32 block tables."""
    lib = library()
    kv_heads, dim = cache.shape[-2:]
    if (lib is None or q.dtype not in SUFFIXES or cache.dtype != q.dtype or not lib.supported_dim(dim)
            or q.shape[1] % kv_heads or meta.block_tables.dtype != torch.int32):
        return None
    return lib


class CpuAttention(TorchAttention):
    """TorchAttention with decode rows and prompt chunks through the C++ kernels where they apply (`_applies`; the
    decode kernel also needs block_size a multiple of 16)."""

    def decode(self, q, cache, meta, scale, window, out) -> None:
        lib = _applies(q, cache, meta)
        if lib is None or cache.shape[2] % LANES:
            return super().decode(q, cache, meta, scale, window, out)
        d = meta.num_decodes
        q, tables, lens = q[:d].contiguous(), meta.block_tables[:d].contiguous(), meta.seq_lens[:d].contiguous()
        getattr(lib, f"decode_{SUFFIXES[q.dtype]}")(
            out.data_ptr(), q.data_ptr(), cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), d, q.shape[1],
            cache.shape[-2], cache.shape[-1], cache.shape[1], cache.shape[2], tables.shape[1], scale, window or 0,
            torch.get_num_threads())

    def prompts(self, q, k, v, cache, meta, scale, window, out) -> None:
        d, rows = meta.num_decodes, len(meta.query_lens_host)
        if rows == d:
            return None
        lib = _applies(q, cache, meta)
        if lib is None or not out.is_contiguous():
            return super().prompts(q, k, v, cache, meta, scale, window, out)
        q = q.contiguous()  # the kernel finds a row's tokens by their index in the step
        tables = meta.block_tables[d:rows].contiguous()
        starts, lens = meta.query_start[d:rows + 1].contiguous(), meta.seq_lens[d:rows].contiguous()
        getattr(lib, f"prompt_{SUFFIXES[q.dtype]}")(
            out.data_ptr(), q.data_ptr(), cache.data_ptr(), tables.data_ptr(), starts.data_ptr(), lens.data_ptr(),
            rows - d, q.shape[1], cache.shape[-2], cache.shape[-1], cache.shape[1], cache.shape[2], tables.shape[1],
            scale, window or 0, torch.get_num_threads())

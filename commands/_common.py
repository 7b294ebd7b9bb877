"""Helpers shared by subcommands."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

err_console = Console(stderr=True)


def not_implemented(command: str) -> None:
    """Fail loudly for a command whose implementation has not landed yet (never a fake success)."""
    err_console.print(f"[red]tgis {command}: not implemented yet[/red]")
    raise typer.Exit(code=2)


def is_model(name: str) -> bool:
    """Whether `name` names a usable model (a directory with config.json, or a hub id complete in the cache)."""
    from runtime.hub import ModelNotFoundError, resolve_model_path

    try:
        resolve_model_path(name)
    except (ModelNotFoundError, ValueError, OSError):
        return False
    return True


def resolve_model(name: str | None, revision: str | None = None) -> Path:
    """A model directory for `name`; the built-in default model (prepared on first use) when None."""
    from runtime.hub import ModelNotFoundError, resolve_model_or_default

    try:
        return resolve_model_or_default(name, revision)
    except ModelNotFoundError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(code=1) from exc

"""Helpers shared by subcommands."""

from __future__ import annotations

import typer
from rich.console import Console

err_console = Console(stderr=True)


def not_implemented(command: str) -> None:
    """Fail loudly for a command whose implementation has not landed yet (never a fake success)."""
    err_console.print(f"[red]tgis {command}: not implemented yet[/red]")
    raise typer.Exit(code=2)

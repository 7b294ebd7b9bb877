"""Helpers shared by subcommands: the user-facing error type, model arguments, shared option checks."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

err_console = Console(stderr=True)


class CliError(Exception):
    """A mistake or failure the user can act on: one red line on stderr, exit `code` (2 usage, 1 run time)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def is_model(name: str) -> bool:
    """Whether `name` names a usable model (a directory with config.json, or a hub id complete in the cache)."""
    from runtime.hub import ModelNotFoundError, resolve_model_path

    try:
        resolve_model_path(name)
    except (ModelNotFoundError, ValueError, OSError):
        return False
    return True


def looks_like_path(arg: str) -> bool:
    """An argument no prompt would be: no whitespace, shaped like a path or a hub id (./x, ../x, /x, ~/x, org/x)."""
    return bool(arg) and not any(c.isspace() for c in arg) and (arg.startswith((".", "/", "~")) or "/" in arg)


def split_model_argument(args: list[str], model: str | None) -> tuple[str | None, list[str]]:
    """`[MODEL] TEXT...`: the first of several arguments is the model when it is one, or when it looks like a path
    or a hub id, so that a missing model fails loudly instead of silently becoming a prompt."""
    if model is None and len(args) > 1 and (looks_like_path(args[0]) or is_model(args[0])):
        return os.path.expanduser(args[0]), args[1:]
    return model, args


def resolve_model(name: str | None, revision: str | None = None) -> Path:
    """A model directory for `name`; the built-in default model (prepared on first use) when None. A missing model
    raises ModelNotFoundError, whose message says how to fetch it."""
    from runtime.hub import resolve_model_or_default

    return resolve_model_or_default(name, revision)


def check_dtype(value: str | None) -> str | None:
    """typer callback for `--dtype`: the names the loader accepts, checked before anything loads."""
    from runtime.config import DTYPES

    if value is not None and value not in DTYPES:
        raise typer.BadParameter(f"'{value}' is not a dtype: use one of {', '.join(DTYPES)}")
    return value

"""`tgis serve`: the TGIS-compatible gRPC server. Its options are generated from `runtime.config.ServerConfig`."""

from __future__ import annotations

import inspect

import typer

from runtime.config import ServerConfig, option_fields, parse_bool


def serve(**options) -> None:
    """Serve fmaas.GenerationService over gRPC (default port 8033) with /health and /metrics over HTTP (3000).

    Every option also reads its TGIS environment variable. SIGTERM/SIGINT let in-flight requests finish, then exit 0.
    The engine runs in its own process with one torch thread per core less one for the front end (OMP_NUM_THREADS
    overrides).
    """
    from runtime.server.app import run

    code = run(ServerConfig(**options))
    if code:
        raise typer.Exit(code)


def _parameters() -> list[inspect.Parameter]:
    params = []
    for name, base, default, meta in option_fields():
        extra = {"parser": parse_bool, "metavar": "BOOL"} if meta["explicit_bool"] else {}
        envvar = meta["env"][0] if len(meta["env"]) == 1 else list(meta["env"])  # a list would show as a repr
        option = typer.Option(default, *meta["flags"], envvar=envvar, help=meta["help"], rich_help_panel=meta["panel"],
                              show_envvar=True, show_default=default is not None, **extra)
        annotation = str if meta["explicit_bool"] else base if default is not None else base | None
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


serve.__signature__ = inspect.Signature(_parameters())

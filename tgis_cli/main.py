"""The Typer root app: global options and the registration of every subcommand.

Imports stay light here and in every command module (torch, transformers and grpc load inside the commands), so
`tgis --help` and `tgis CMD --help` answer at once. `TgisGroup` (tgis_cli/errors.py) reports any failure as one line.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

import typer

from commands import bench, convert, download_weights, generate, serve, shard, tokenize
from tgis_cli.errors import TgisCommand, TgisGroup

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

app = typer.Typer(
    name="tgis",
    help="TGIS-compatible text-generation inference server and toolkit (fmaas.GenerationService over gRPC).",
    cls=TgisGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version() -> str:
    try:
        return version("tgis")
    except PackageNotFoundError:
        return "0+unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tgis {_version()}")
        raise typer.Exit()


def _log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"'{value}' is not a log level: use one of {', '.join(LOG_LEVELS)}")
    return value.upper()


@app.callback()
def main(
    version_: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Show version."),
    log_level: str = typer.Option("info", "--log-level", envvar="LOG_LEVEL", callback=_log_level,
                                  help=f"Logging level: {', '.join(LOG_LEVELS)} (debug also shows tracebacks)."),
) -> None:
    """Global options shared by every subcommand."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(log_level)


app.command("download-weights", cls=TgisCommand)(download_weights.download_weights)
app.command("convert-to-safetensors", cls=TgisCommand)(convert.convert_to_safetensors)
app.command("serve", cls=TgisCommand, context_settings={"auto_envvar_prefix": None})(serve.serve)
app.command("shard", cls=TgisCommand)(shard.shard)
app.command("tokenize", cls=TgisCommand)(tokenize.tokenize)
app.command("generate", cls=TgisCommand)(generate.generate)
app.command("bench", cls=TgisCommand)(bench.bench)

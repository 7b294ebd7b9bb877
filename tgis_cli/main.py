"""The Typer root app: global options and the registration of every subcommand."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

import typer

from commands import bench, convert, download_weights, generate, serve, shard, tokenize

app = typer.Typer(
    name="tgis",
    help="TGIS-compatible text-generation inference server and toolkit (fmaas.GenerationService over gRPC).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
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


@app.callback()
def main(
    version_: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Show version."),
    log_level: str = typer.Option("INFO", "--log-level", envvar="LOG_LEVEL", help="Logging level."),
) -> None:
    """Global options shared by every subcommand."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


app.command("download-weights")(download_weights.download_weights)
app.command("convert-to-safetensors")(convert.convert_to_safetensors)
app.command("serve", context_settings={"auto_envvar_prefix": None})(serve.serve)
app.command("shard")(shard.shard)
app.command("tokenize")(tokenize.tokenize)
app.command("generate")(generate.generate)
app.command("bench")(bench.bench)

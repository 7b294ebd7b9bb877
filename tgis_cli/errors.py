"""One error handler for every `tgis` command, and the click classes that carry it.

Whatever a command raises (a bad option value, a model that is not there, a server that is not running, a failure
deep in the runtime) ends as one red line on stderr that says what went wrong and what to do, and the exit code
says whose fault it was: 2 for usage (a bad option or argument), 1 for a failure at run time. The traceback is
printed only at debug log level (`tgis --log-level debug ...`).
"""

from __future__ import annotations

import logging
import sys
import traceback

from rich.text import Text
from typer import Abort
from typer.core import TyperCommand, TyperGroup, TyperOption

try:  # recent typer vendors its own click: these are the classes it raises
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # an older typer on plain click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from commands._common import CliError, err_console
from runtime.config import ConfigError

USAGE, RUNTIME = 2, 1
DEBUG_HINT = " (rerun with `tgis --log-level debug ...` for the traceback)"


def _rpc_error(exc: BaseException) -> str | None:
    """A failed gRPC call in words (grpcio's own str() is a multi-line repr), without importing grpc."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if not (callable(code) and callable(details)):
        return None
    hint = " (is a server listening at that address?)" if code().name == "UNAVAILABLE" else ""
    return f"gRPC {code().name}: {details()}{hint}"


def describe(exc: BaseException) -> tuple[str, int, bool]:
    """(message, exit code, whether the message is all the user needs: no traceback hint)."""
    if isinstance(exc, UsageError):
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        return exc.format_message() + hint, exc.exit_code, True
    if isinstance(exc, ClickException):
        return exc.format_message(), exc.exit_code, True
    if isinstance(exc, CliError):
        return str(exc), exc.code, True
    if isinstance(exc, ConfigError):
        return str(exc), USAGE, True
    rpc = _rpc_error(exc)
    if rpc is not None:
        return rpc, RUNTIME, True
    ours = type(exc).__module__.startswith(("runtime.", "commands."))  # our messages are written for the user
    if (ours or isinstance(exc, ValueError | OSError)) and str(exc):
        return str(exc), RUNTIME, True
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, RUNTIME, False


def report(exc: BaseException) -> int:
    """Print `exc` as one line (plus the traceback at debug level); the exit code."""
    message, code, plain = describe(exc)
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    if debug and not isinstance(exc, ClickException):
        traceback.print_exception(exc, file=sys.stderr)
    one_line = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    err_console.print(Text(f"Error: {one_line}{'' if plain or debug else DEBUG_HINT}", style="red"), soft_wrap=True)
    return code


def _hide_flag_types(params: list) -> list:
    """Flags take no value: show no `<bool>` type for them in help."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class TgisCommand(TyperCommand):
    def get_params(self, ctx) -> list:
        return _hide_flag_types(super().get_params(ctx))


class TgisGroup(TyperGroup):
    """The root group: runs the command line with the error handler around everything, usage errors included."""

    def get_params(self, ctx) -> list:
        return _hide_flag_types(super().get_params(ctx))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except NoArgsIsHelpError as exc:  # the help is already printed
            code = exc.exit_code
        except Abort:
            code = 130
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else RUNTIME
        except Exception as exc:  # noqa: BLE001 - the one place every command's failure is reported
            code = report(exc)
        if standalone_mode:
            sys.exit(code)
        return code

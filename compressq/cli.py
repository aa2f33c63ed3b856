"""Typer commands: parse options, call one function, render its result. No algorithm lives here."""

from __future__ import annotations

import functools
import os
import sys

import typer
from rich.markup import escape

from compressq import __version__, render
from compressq.errors import CompressqError

app = typer.Typer(
    name="compressq",
    help="Make ONNX models smaller and faster without breaking them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_INTERNAL = 3
_debug = {"on": os.environ.get("COMPRESSQ_DEBUG") == "1"}


def reports_errors(command):
    """Turn CompressqError into one line on stderr and its exit code; --debug shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CompressqError as exc:
            if _debug["on"]:
                raise
            hint = f" [dim]hint: {escape(exc.hint)}[/]" if exc.hint else ""
            render.stderr.print(f"[bold red]error:[/] {escape(exc.message)}{hint}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            render.stderr.print("interrupted; no output was written")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug of ours: say so in one line, keep the traceback for --debug
            if _debug["on"]:
                raise
            render.stderr.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
                                "[dim]hint: rerun with --debug for the traceback and report it[/]",
                                highlight=False)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"compressq {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    if debug:
        _debug["on"] = True


def _register_commands() -> None:
    from compressq.commands.data import data
    from compressq.commands.inspect import inspect
    from compressq.commands.prune import prune
    from compressq.commands.quantize import quantize
    from compressq.commands.report import report
    from compressq.commands.sensitivity import sensitivity

    for command in (inspect, data, quantize, report, prune, sensitivity):
        app.command()(reports_errors(command))


_register_commands()


def main() -> None:
    # Accept --debug anywhere on the line, not only before the command name.
    if "--debug" in sys.argv[2:]:
        sys.argv.remove("--debug")
        _debug["on"] = True
    app()

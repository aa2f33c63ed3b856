"""Typer commands: parse options, call one function, render its result. No algorithm lives here.

What the user sees of a failure is one line on stderr and an exit code (compressq.errors lists them):
bad input and usage errors 2, a failed gate 1, a bug of ours 3, Ctrl-C 130, SIGTERM 143. `--debug` adds
the traceback and keeps the exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # also in compressq.errors, which is not imported yet


def _exit_quietly(signum, frame) -> None:
    """Ctrl-C or SIGTERM while the heavy imports below run: nothing has started, so leave at once."""
    os.write(2, b"interrupted\n")
    os._exit(EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED)


def _install(handlers: dict) -> dict:
    saved = {}
    for signum, handler in handlers.items():
        # not the main thread, or a handler installed from C (None) that cannot be put back
        with contextlib.suppress(ValueError, OSError, TypeError):
            saved[signum] = signal.signal(signum, handler)
    return saved


_before_imports = _install({signal.SIGINT: _exit_quietly, signal.SIGTERM: _exit_quietly})

import functools  # noqa: E402  (imported after the quiet interrupt handler on purpose)
import traceback  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from compressq import __version__  # noqa: E402
from compressq.cli.views import console as render  # noqa: E402
from compressq.errors import EXIT_INTERNAL, CompressqError, Terminated  # noqa: E402
from compressq.graph import passes  # noqa: E402

if TYPE_CHECKING:  # checked against the typer of the dev environment, which carries its own click
    from typer._click.exceptions import ClickException
else:
    try:  # typer >= 0.2x carries its own click
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click.exceptions import ClickException

_debug = {"on": os.environ.get("COMPRESSQ_DEBUG") == "1"}


def print_error(message: str, hint: str | None = None, *, label: str = "error") -> None:
    """The one error line: `error: MESSAGE hint: HINT`; user strings are shown, never interpreted."""
    hint_part = (f" hint: {hint}", "dim") if hint else ""
    render.stderr.print(render.styled((f"{label}:", "bold red"), f" {message}", hint_part), soft_wrap=True)


class OneLineErrors(TyperGroup):
    """Usage errors from the option parser as one `error:` line with a hint (exit 2), not a boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `compressq`: the help text is the answer
                exc.show()
            else:
                print_error(exc.format_message(), _usage_hint(exc))
            sys.exit(exc.exit_code)
        except typer.Abort:  # the parser's own Ctrl-C (click turns KeyboardInterrupt into Abort)
            _say_last("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_hint(exc: ClickException) -> str:
    context = getattr(exc, "ctx", None)
    command = context.command_path if context is not None else "compressq"
    return f"see '{command} --help'"


app = typer.Typer(
    name="compressq",
    help="Make ONNX models smaller and faster without breaking them.",
    cls=OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" is shown, not read as markup
)


def reports_errors(command):
    """Turn CompressqError into one line on stderr and its exit code; --debug adds the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CompressqError as exc:
            if _debug["on"]:
                traceback.print_exc()
            print_error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated: `finally` blocks already ran
            terminated = isinstance(exc, Terminated)
            # An output is renamed into place whole or never: the interrupt may have come before or after.
            _say_last(f"{'terminated' if terminated else 'interrupted'}; no partial output was left")
            raise typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug of ours: say so in one line, keep the traceback for --debug
            if _debug["on"]:
                traceback.print_exc()
            print_error(f"{type(exc).__name__}: {exc}", "rerun with --debug for the traceback and report it",
                        label="internal error")
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _say_last(line: str) -> None:
    """One line on stderr straight to the file descriptor: the interrupt may have landed inside a console's
    own write, whose buffers are then not to be trusted."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.write(2, (line + "\n").encode("utf-8", "replace"))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"compressq {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks too (exit codes stay the same)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    if debug:
        _debug["on"] = True
        passes.enable_checks()  # every pass proves it kept the model valid and its interface unchanged


def _register_commands() -> None:
    from compressq.cli.data import data
    from compressq.cli.inspect import inspect
    from compressq.cli.prune import prune
    from compressq.cli.quantize import quantize
    from compressq.cli.report import report
    from compressq.cli.sensitivity import sensitivity

    for command in (inspect, data, quantize, report, prune, sensitivity):
        app.command()(reports_errors(command))


_register_commands()
_install(_before_imports)  # an importer (tests, a library user) gets its own handlers back


def _on_terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    # Ctrl-C raises KeyboardInterrupt and SIGTERM raises Terminated: both unwind through `finally`
    # (staging folders removed) and end as one line with exit 130 or 143.
    callers = _install({signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _on_terminate})
    # Accept --debug anywhere on the line, not only before the command name.
    if "--debug" in sys.argv[2:]:
        sys.argv.remove("--debug")
        _debug["on"] = True
        passes.enable_checks()
    try:
        app(prog_name="compressq")
    finally:
        # The program itself ends here: a Ctrl-C while the interpreter shuts down must not print a traceback.
        # A caller in the same process (a test, a script) gets its own handlers back instead.
        ending = {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}
        _install(ending if _running_as_the_program() else callers)


def _running_as_the_program() -> bool:
    """`compressq ...` (the console script) or `python -m compressq`, not an importer calling main()."""
    program = sys.modules.get("__main__")
    spec = getattr(program, "__spec__", None)
    if spec is not None:
        return spec.name in ("compressq", "compressq.__main__")
    return os.path.basename(getattr(program, "__file__", None) or "") == "compressq"

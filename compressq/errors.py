"""Errors that reach the user as one line (what is wrong) plus a hint (what to do).

The CLI maps each kind to an exit code; nothing below the CLI prints or exits.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3  # a bug of ours
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15


class CompressqError(Exception):
    """A failure the user can act on."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ModelError(CompressqError):
    """The model file cannot be read, is not ONNX, or is not a valid graph."""


class DataError(CompressqError):
    """Calibration or evaluation data does not fit the model."""


class UsageError(CompressqError):
    """Options that contradict each other or cannot be honoured."""


class OutputError(CompressqError):
    """The output cannot be written where asked (or would overwrite an input)."""


class ProviderError(CompressqError):
    """The requested onnxruntime execution provider is not available."""


class TargetNotMet(CompressqError):
    """An accuracy or speed target could not be met; CI should fail the build."""

    exit_code = EXIT_GATE_FAILED


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C (staging removed by `finally`), then exits 143."""

    exit_code = EXIT_TERMINATED

"""The one progress protocol: algorithms report `progress(stage, done, total)` and never draw anything.

The command line turns it into bars (cli/views/progress.py); the Python API passes nothing and sees nothing.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


class Stage:
    """Counts work done in one stage and reports it through `progress`, for loops that advance in steps."""

    def __init__(self, progress: Progress | None, name: str, total: int):
        self.progress, self.name, self.total, self.done = progress, name, total, 0
        self._report()

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.name, min(self.done, self.total), self.total)

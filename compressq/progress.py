"""The one progress protocol: algorithms report `progress(stage, done, total)` and never draw anything.

The command line turns it into bars (cli/views/progress.py); the Python API passes nothing and sees nothing.
`total` <= 0 means the total is not known (the view then shows no time remaining). What `done` counts is
samples, tensors or bytes: a stage counting bytes says so once, through `Stage(..., unit=BYTES)`, which tells a
callback that has a `set_unit(stage, unit)` method (the command line's); a plain three-argument function, as a
Python caller passes, keeps working and is never told.

The time remaining is the stage's average rate so far applied to what is left (`remaining_seconds`), not a
recent-window rate: a step that finishes one large tensor a minute gives a recent window nothing to go on.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]

COUNT = "count"   # samples, tensors, steps
BYTES = "bytes"
UNITS = (COUNT, BYTES)


class Stage:
    """Counts work done in one stage and reports it through `progress`, for loops that advance in steps."""

    def __init__(self, progress: Progress | None, name: str, total: int, unit: str = COUNT):
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")
        self.progress, self.name, self.total, self.done = progress, name, total, 0
        set_unit = getattr(progress, "set_unit", None)
        if unit != COUNT and callable(set_unit):
            set_unit(name, unit)
        self._report()

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.name, min(self.done, self.total) if self.total > 0 else self.done, self.total)


def remaining_seconds(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the average rate so far; None while it cannot be known (no total, nothing done yet)."""
    if total <= 0 or done <= 0 or elapsed <= 0:
        return None
    if done >= total:
        return 0.0
    return elapsed * (total - done) / done

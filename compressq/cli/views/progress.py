"""The one progress view: what algorithms report through a plain callback, drawn on stderr only.

Algorithms call `update(stage, done, total)` and never import rich. On a terminal each stage gets a bar with
done / total (bytes as MiB / GiB when the stage counts bytes), the elapsed time and the time remaining where a
total is known. Where stderr is a file or a pipe (a long run under nohup, a CI log) a live display would leave
blank lines, so a stage that runs longer than LOG_AFTER_S writes one plain line every LOG_EVERY_S instead, and
one when it ends. `--json` runs (quiet) get nothing: stdout carries the JSON and nothing else, ever.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from compressq.cli.views import console as render
from compressq.progress import BYTES, COUNT, remaining_seconds

LOG_AFTER_S = 10.0   # a stage shorter than this writes no line to a log
LOG_EVERY_S = 30.0

Clock = Callable[[], float]


def amount(done: float, total: float, unit: str) -> str:
    """`3/10`, `120.0 MiB/1.5 GiB`; only `done` where the total is unknown."""
    show = render.human_bytes if unit == BYTES else (lambda value: f"{value:.0f}")
    return f"{show(done)}/{show(total)}" if total > 0 else show(done)


def duration(seconds: float) -> str:
    """`0:07`, `12:30`, `1:02:03`."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status_line(stage: str, done: float, total: float, unit: str, elapsed: float) -> str:
    """One plain line for a log: `quantizing weights: 120.0 MiB/480.0 MiB (25 %), 0:40 elapsed, 2:00 left`."""
    parts = [f"{render.printable(stage)}: {amount(done, total, unit)}"]
    if total > 0:
        parts[0] += f" ({100 * min(done, total) / total:.0f} %)"
    parts.append(f"{duration(elapsed)} elapsed")
    left = remaining_seconds(done, total, elapsed)
    if left is not None:
        parts.append(f"{duration(left)} left")
    return ", ".join(parts)


class _AmountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(amount(task.completed, task.total or 0, task.fields.get("unit", COUNT)))


class _RemainingColumn(ProgressColumn):
    """The time left at the stage's average rate (rich's own column goes blank between slow steps)."""

    def render(self, task: Task) -> Text:
        left = remaining_seconds(task.completed, task.total or 0, task.elapsed or 0.0)
        return Text("" if left is None or task.finished else f"{duration(left)} left")


class _Bars:
    """Rich bars on a terminal."""

    def __init__(self, console: Console, clock: Clock):
        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                             _AmountColumn(), TimeElapsedColumn(), _RemainingColumn(), console=console,
                             transient=True, get_time=clock)
        self.tasks: dict[str, TaskID] = {}
        self.units: dict[str, str] = {}

    def set_unit(self, stage: str, unit: str) -> None:
        self.units[stage] = unit

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            # Text, not markup: a stage may carry a model's tensor names
            self.tasks[stage] = self.bars.add_task(render.printable(stage), total=total if total > 0 else None,
                                                   unit=self.units.get(stage, COUNT))
        self.bars.update(self.tasks[stage], completed=done, total=total if total > 0 else None)


@dataclass
class _StageClock:
    started: float
    logged: float | None = None   # when the last line was written
    ended: bool = False


class _LogLines:
    """Plain lines on a non-terminal stderr, for stages long enough to need them."""

    def __init__(self, console: Console, clock: Clock):
        self.console, self.clock = console, clock
        self.stages: dict[str, _StageClock] = {}
        self.units: dict[str, str] = {}

    def set_unit(self, stage: str, unit: str) -> None:
        self.units[stage] = unit

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        finished = 0 < total <= done
        state = self.stages.get(stage)
        if state is None or (state.ended and not finished):  # new, or a stage name used again from the start
            state = self.stages[stage] = _StageClock(now)
        if state.ended:
            return
        elapsed = now - state.started
        due = (elapsed >= LOG_AFTER_S if state.logged is None else now - state.logged >= LOG_EVERY_S)
        if due or (finished and state.logged is not None):
            self.console.print(status_line(stage, done, total, self.units.get(stage, COUNT), elapsed),
                               soft_wrap=True)
            state.logged = now
        state.ended = finished


@contextmanager
def stage_progress(quiet: bool = False, console: Console | None = None,
                   clock: Clock = time.monotonic) -> Iterator[Callable[[str, int, int], None]]:
    """The callback to hand to an algorithm; `console` (stderr unless a test gives one) is where it draws."""
    target = console or render.stderr
    if quiet:
        yield _ignore
    elif not target.is_terminal:
        yield _LogLines(target, clock)
    else:
        bars = _Bars(target, clock)
        with bars.bars:
            yield bars


def _ignore(stage: str, done: int, total: int) -> None:
    """--json: nothing drawn."""

"""The one progress view: rich bars on stderr that algorithms drive through a plain callback.

Algorithms call `update(stage, done, total)` and never import rich; each new stage gets its own bar with a
total, elapsed time and an ETA. Quiet (`--json`) runs, pipes and CI logs get a callback that draws nothing
(a live display on a non-terminal would leave blank lines on stderr).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from compressq.cli.views import console as render
from compressq.progress import Progress as ProgressCallback  # rich has a Progress too


@contextmanager
def stage_progress(quiet: bool = False) -> Iterator[ProgressCallback]:
    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=render.stderr, transient=True, disable=quiet or not render.stderr.is_terminal)
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update

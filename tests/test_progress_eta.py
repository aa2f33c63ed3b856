"""Progress with done / total and the time remaining (compressq/progress.py, cli/views/progress.py): the
estimate, units, bars on a terminal, plain lines in a log, nothing under --json. Clocks are fakes: no test
here waits or times anything."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from compressq.cli.views import progress as view
from compressq.cli.views.progress import amount, duration, stage_progress, status_line
from compressq.progress import BYTES, Stage, remaining_seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=160, markup=False, highlight=False), buffer


# ------------------------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize("done, total, elapsed, expected", [
    (25, 100, 10.0, 30.0),     # a quarter in 10 s: 30 s to go at the same rate
    (3, 4, 90.0, 30.0),
    (100, 100, 50.0, 0.0),
    (120, 100, 50.0, 0.0),     # overshoot reads as done
])
def test_remaining_is_the_average_rate_applied_to_what_is_left(done, total, elapsed, expected):
    assert remaining_seconds(done, total, elapsed) == pytest.approx(expected)


@pytest.mark.parametrize("done, total, elapsed", [(5, 0, 10.0), (5, -1, 10.0), (0, 100, 10.0), (5, 100, 0.0)])
def test_no_estimate_without_a_total_or_before_any_work(done, total, elapsed):
    assert remaining_seconds(done, total, elapsed) is None


def test_amount_and_duration_read_as_a_person_reads_them():
    assert amount(3, 10, "count") == "3/10"
    assert amount(7, 0, "count") == "7"
    assert amount(120 * 2**20, 3 * 2**30, BYTES) == "120.0 MiB/3.0 GiB"
    assert [duration(s) for s in (7, 750, 3723)] == ["0:07", "12:30", "1:02:03"]


def test_status_line_has_done_total_share_elapsed_and_time_left():
    line = status_line("quantizing weights", 2**30, 4 * 2**30, BYTES, 40.0)
    assert line == "quantizing weights: 1.0 GiB/4.0 GiB (25 %), 0:40 elapsed, 2:00 left"
    assert status_line("reading", 5, 0, "count", 3.0) == "reading: 5, 0:03 elapsed"   # no total: no estimate


# ------------------------------------------------------------------------------------------- Stage and units


def test_stage_tells_a_unit_aware_callback_its_unit_and_plain_callbacks_still_work():
    class Recorder:
        def __init__(self) -> None:
            self.units: dict[str, str] = {}
            self.calls: list[tuple[str, int, int]] = []

        def set_unit(self, stage: str, unit: str) -> None:
            self.units[stage] = unit

        def __call__(self, stage: str, done: int, total: int) -> None:
            self.calls.append((stage, done, total))

    recorder = Recorder()
    stage = Stage(recorder, "writing", 300, unit=BYTES)
    stage.advance(100)
    assert recorder.units == {"writing": BYTES}
    assert recorder.calls == [("writing", 0, 300), ("writing", 100, 300)]
    plain: list[tuple[str, int, int]] = []
    Stage(lambda *args: plain.append(args), "writing", 300, unit=BYTES).advance(400)
    assert plain == [("writing", 0, 300), ("writing", 300, 300)]   # clamped at the total


def test_a_stage_without_a_total_reports_what_it_has_done():
    calls: list[tuple[str, int, int]] = []
    stage = Stage(lambda *args: calls.append(args), "scanning", 0)
    stage.advance(7)
    assert calls[-1] == ("scanning", 7, 0)


def test_unknown_units_are_refused():
    with pytest.raises(ValueError, match="unit"):
        Stage(None, "x", 1, unit="furlongs")


# ------------------------------------------------------------------------------------------- the views


def test_terminal_bar_shows_done_total_and_time_left():
    clock, (terminal, _) = FakeClock(), console(terminal=True)
    with stage_progress(console=terminal, clock=clock) as update:
        Stage(update, "quantizing weights", 4 * 2**30, unit=BYTES)
        clock.now += 40
        update("quantizing weights", 2**30, 4 * 2**30)
        bars = update.bars
        task = bars.tasks[0]
        columns = {type(column).__name__: column for column in bars.columns}
        assert str(columns["_AmountColumn"].render(task)) == "1.0 GiB/4.0 GiB"
        assert str(columns["_RemainingColumn"].render(task)) == "2:00 left"
        update("counting", 3, 0)                                    # no total: no estimate
        counting = bars.tasks[1]
        assert str(columns["_AmountColumn"].render(counting)) == "3"
        assert str(columns["_RemainingColumn"].render(counting)) == ""


def test_stage_names_are_text_not_markup():
    clock, (terminal, _) = FakeClock(), console(terminal=True)
    with stage_progress(console=terminal, clock=clock) as update:
        update("layer [bold]x[/bold]\x1b[2J", 1, 2)
        assert update.bars.tasks[0].description == "layer [bold]x[/bold]\\x1b[2J"


def test_log_lines_only_for_long_stages_then_every_interval_and_at_the_end():
    clock, (log, buffer) = FakeClock(), console(terminal=False)
    with stage_progress(console=log, clock=clock) as update:
        update("short", 0, 3)
        clock.now += view.LOG_AFTER_S / 2
        update("short", 3, 3)                                       # done before LOG_AFTER_S: silent
        update("calibrating", 0, 100)
        clock.now += view.LOG_AFTER_S
        update("calibrating", 10, 100)                              # first line
        clock.now += 1
        update("calibrating", 11, 100)                              # too soon for another
        clock.now += view.LOG_EVERY_S
        update("calibrating", 50, 100)                              # second line
        update("calibrating", 100, 100)                             # the end
        update("calibrating", 100, 100)                             # said once
    lines = buffer.getvalue().splitlines()
    assert lines == [
        f"calibrating: 10/100 (10 %), {duration(view.LOG_AFTER_S)} elapsed, "
        f"{duration(view.LOG_AFTER_S * 9)} left",
        f"calibrating: 50/100 (50 %), {duration(view.LOG_AFTER_S + 1 + view.LOG_EVERY_S)} elapsed, "
        f"{duration(view.LOG_AFTER_S + 1 + view.LOG_EVERY_S)} left",
        f"calibrating: 100/100 (100 %), {duration(view.LOG_AFTER_S + 1 + view.LOG_EVERY_S)} elapsed, 0:00 left",
    ]


def test_quiet_draws_nothing_anywhere(capsys):
    clock, (terminal, buffer) = FakeClock(), console(terminal=True)
    with stage_progress(quiet=True, console=terminal, clock=clock) as update:
        update("calibrating", 0, 10)
        clock.now += 1000
        update("calibrating", 5, 10)
    assert buffer.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_the_cli_draws_on_stderr_never_stdout(capsys, monkeypatch):
    """The consoles the views use: progress goes to the stderr one, so --json's stdout stays JSON only."""
    clock = FakeClock()
    with stage_progress(clock=clock) as update:   # stderr is not a terminal under pytest: log lines
        update("calibrating", 0, 10)
        clock.now += view.LOG_AFTER_S
        update("calibrating", 5, 10)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "calibrating: 5/10" in captured.err

"""Speed decisions that the neighbours cannot flip.

A decision times the work itself, not the time a thread waited for a core. At one intra-op thread
onnxruntime runs the whole graph on the calling thread, so that thread's CPU time is the model's cost,
whatever else the machine runs (shared/MEASURED.md: ratios held within 3 % at load 6 on 2 cores, where
wall-clock medians swung 4x). At N threads the pool's workers do part of the work: the process's CPU time,
with idle workers sleeping instead of spinning, counts all of it. Wall clock is what `report` shows; it
never decides here.

Runs alternate (baseline, candidate, baseline, ...) so drifts hit both; a close call is measured again
with more runs; and a ratio within the noise band of the bar counts as meeting it, so that two runs of the
same command reach the same decision.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from compressq.evaluate.latency import Clock, LatencyStats, RunsFeeds, time_interleaved
from compressq.runtime import create_session

RUNS = 15
WARMUP = 3
BLOCK_MS = 10.0        # fast models are timed in blocks of back-to-back runs lasting at least this long
MAX_REPEAT = 50
CLOSE_CALL = 0.1       # ratios within 10 % of the bar are measured again with LONG_RUNS
LONG_RUNS = 4 * RUNS
# Thread CPU time still moves by 1-3 % between runs: a ratio this close to a bar meets it. Without the band
# a model at 1.00x flips between int8 and float from one run to the next.
NOISE_TOLERANCE = 0.02
FASTER_ENOUGH = 1.0 - NOISE_TOLERANCE
# A speedup this large needs no search for a better variant. Below it, smaller int8 variants are measured
# too, so that a plan near 1.0x is never kept by the luck of one measurement while a clearly faster one exists.
CONVINCING = 1.0 + CLOSE_CALL

ModelOrPath = onnx.ModelProto | str | os.PathLike  # what create_session opens; report passes paths


@dataclass(frozen=True)
class SpeedMeasurement:
    """baseline cost / candidate cost, measured as `clock_name` says."""

    ratio: float             # median of the per-turn paired ratios
    ratio_q1: float          # and their interquartile range
    ratio_q3: float
    baseline_ms: float       # medians, in the clock's milliseconds
    candidate_ms: float
    runs: int
    threads: int
    batch: int
    clock_name: str

    def describe(self) -> str:
        threads = "1 thread" if self.threads == 1 else f"{self.threads} threads"
        return (f"{self.clock_name}, {threads}, batch {self.batch}, "
                f"median of {self.runs} interleaved runs [IQR {self.ratio_q1:.2f}-{self.ratio_q3:.2f}]")

    def to_dict(self) -> dict:
        return {**asdict(self), "how": self.describe()}


def decision_clock(threads: int, provider: str = "cpu") -> tuple[Clock, str]:
    """The clock that measures work at `threads` intra-op threads, and how to say so."""
    if provider != "cpu":  # the work happens on the device, where no CPU clock sees it
        return time.perf_counter, f"wall clock ({provider}: device work is invisible to CPU time)"
    if threads == 1:
        return time.thread_time, "calling thread's CPU time"
    return time.process_time, "process CPU time (pool threads not spinning)"


def speed_from_stats(baseline: LatencyStats, candidate: LatencyStats, threads: int, batch: int, clock_name: str,
                     ) -> SpeedMeasurement:
    """The ratio is the median of the per-turn ratios: a burst that slows one turn slows both runs in it."""
    paired = np.asarray(baseline.samples_ms) / np.maximum(np.asarray(candidate.samples_ms), 1e-9)
    q1, median, q3 = np.percentile(paired, [25, 50, 75])
    return SpeedMeasurement(float(median), float(q1), float(q3), baseline.median_ms, candidate.median_ms,
                            len(baseline.samples_ms), threads, batch, clock_name)


def time_sessions(sessions: Sequence[RunsFeeds], feeds: Sequence[dict], *, runs: int, threads: int,
                  provider: str = "cpu", clock: Clock | None = None, clock_name: str | None = None,
                  ) -> list[SpeedMeasurement]:
    """Interleaved runs of ready sessions; each later session measured against the first (tests pass fakes)."""
    stats, clock_name, batch = _session_stats(sessions, feeds, runs, threads, provider, clock, clock_name)
    return [speed_from_stats(stats[0], stats[i], threads, batch, clock_name) for i in range(1, len(sessions))]


def _session_stats(sessions, feeds, runs, threads, provider, clock, clock_name) -> tuple[list[LatencyStats], str, int]:
    """Fast models are timed in blocks of back-to-back runs (BLOCK_MS at least), so that one sample is not one
    cache-cold millisecond."""
    if clock is None:
        clock, clock_name = decision_clock(threads, provider)
    # The first input with a samples axis says the batch (a scalar input, e.g. an If's flag, has none).
    batch = next((int(v.shape[0]) for v in feeds[0].values() if v.ndim), 1) if feeds and feeds[0] else 1
    named = {str(i): session for i, session in enumerate(sessions)}
    repeat = _block_repeat(sessions[0], feeds[0], clock)
    stats = time_interleaved(named, feeds, runs=runs, warmup=WARMUP, clock=clock, repeat=repeat)
    return [stats[str(i)] for i in range(len(sessions))], clock_name or "custom clock", batch


def time_pair(baseline: RunsFeeds, candidate: RunsFeeds, feeds: Sequence[dict], *, runs: int, threads: int,
              provider: str = "cpu", clock: Clock | None = None, clock_name: str | None = None) -> SpeedMeasurement:
    return time_sessions([baseline, candidate], feeds, runs=runs, threads=threads, provider=provider, clock=clock,
                         clock_name=clock_name)[0]


def _block_repeat(session: RunsFeeds, feed: dict, clock: Clock) -> int:
    session.run(None, feed)
    start = clock()
    session.run(None, feed)
    one_ms = (clock() - start) * 1000.0
    return max(1, min(MAX_REPEAT, int(np.ceil(BLOCK_MS / max(one_ms, 1e-3)))))


def settle(measure: Callable[[int], SpeedMeasurement], bar: float = 1.0) -> SpeedMeasurement:
    """Measure; when the ratio lands close to `bar`, measure again with more runs before anyone decides."""
    first = measure(RUNS)
    if abs(first.ratio - bar) < CLOSE_CALL:
        return measure(LONG_RUNS)
    return first


def measure_speedup(baseline: ModelOrPath, candidate: ModelOrPath, feeds: list[dict], provider: str = "cpu",
                    threads: int = 1, runs: int | None = None) -> SpeedMeasurement:
    """How many times less work `candidate` does than `baseline` on `feeds` (never wall clock).

    With `runs` given, one measurement of that many runs; otherwise `settle`'s close-call rule.
    """
    baseline_session = create_session(baseline, provider, threads=threads, spinning=False)
    candidate_session = create_session(candidate, provider, threads=threads, spinning=False)

    def measure(count: int) -> SpeedMeasurement:
        return time_pair(baseline_session, candidate_session, feeds, runs=count, threads=threads, provider=provider)

    return measure(runs) if runs else settle(measure)


@dataclass(frozen=True)
class HeadToHead:
    """Two variants timed in the same interleaved runs as fp32: each against fp32, and one against the other."""

    current: SpeedMeasurement
    candidate: SpeedMeasurement
    candidate_over_current: float   # > 1: the candidate does less work (median of the per-turn quotients)


def race(sessions: Sequence[RunsFeeds], feeds: Sequence[dict], *, runs: int, threads: int, provider: str = "cpu",
         clock: Clock | None = None, clock_name: str | None = None) -> HeadToHead:
    """fp32, current and candidate sessions in the same turns (tests pass fakes and a fake clock).

    The quotient is taken turn by turn before the median: a burst of load that slows one turn slows both
    variants in it, and cancels."""
    stats, clock_name, batch = _session_stats(sessions, feeds, runs, threads, provider, clock, clock_name)
    base, current, candidate = stats
    quotients = np.asarray(current.samples_ms) / np.maximum(np.asarray(candidate.samples_ms), 1e-9)
    return HeadToHead(speed_from_stats(base, current, threads, batch, clock_name),
                      speed_from_stats(base, candidate, threads, batch, clock_name), float(np.median(quotients)))


def head_to_head(baseline: onnx.ModelProto, current: onnx.ModelProto, candidate: onnx.ModelProto,
                 feeds: list[dict], provider: str = "cpu", threads: int = 1) -> HeadToHead:
    """Time fp32, the current variant and a candidate together. Two ratios measured apart move by several
    per cent between runs on a busy machine; measured in the same turns, their quotient holds (bench: loaded)."""
    sessions = [create_session(model, provider, threads=threads, spinning=False)
                for model in (baseline, current, candidate)]
    first = race(sessions, feeds, runs=RUNS, threads=threads, provider=provider)
    if abs(first.candidate_over_current - 1.0) < CLOSE_CALL:
        return race(sessions, feeds, runs=LONG_RUNS, threads=threads, provider=provider)
    return first


def meets(ratio: float, bar: float = 1.0) -> bool:
    """A ratio meets the bar when it is at or above it, give or take the noise band."""
    return ratio >= bar - NOISE_TOLERANCE


def convincing(ratio: float) -> bool:
    return ratio >= CONVINCING


def clearly_faster(ratio: float, than: float) -> bool:
    """`ratio` beats `than` by more than the noise band: ties keep what was there (a stable choice)."""
    return ratio > than * (1.0 + NOISE_TOLERANCE)

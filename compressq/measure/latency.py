"""Interleaved timing of several sessions.

Sessions run in turns (A B A B ...) rather than one after the other, so that slow drifts of the machine
(thermal throttling, a noisy neighbour, frequency scaling) hit every model equally and the speedup
ratio stays honest. Each run of A is paired with the run of B in the same turn, which gives the ratio's
spread for free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class RunsFeeds(Protocol):
    """What timing needs of an onnxruntime InferenceSession (tests pass fakes)."""

    def run(self, output_names: Any, input_feed: dict) -> Any: ...


@dataclass
class LatencyStats:
    median_ms: float
    p90_ms: float
    samples_ms: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        values = np.asarray(samples_ms, dtype=np.float64)
        return cls(float(np.median(values)), float(np.percentile(values, 90)), [float(v) for v in values])

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms)) if self.samples_ms else float("nan")

    def throughput(self, batch_size: int) -> float:
        """Samples per second at the median latency."""
        return batch_size * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")


@dataclass
class Speedup:
    """baseline median / candidate median, with the interquartile range of the paired per-turn ratios."""

    ratio: float
    ratio_q1: float
    ratio_q3: float


Clock = Callable[[], float]  # seconds, monotonic over one timing loop


def time_interleaved(sessions: Mapping[str, RunsFeeds], feeds: Sequence[dict], runs: int = 20,
                     warmup: int = 3, progress: Callable[[int], None] | None = None,
                     clock: Clock = time.perf_counter, repeat: int = 1) -> dict[str, LatencyStats]:
    """Time every session on the same feeds, taking turns; `progress(1)` after each timed turn.

    Turn i uses feeds[i % len(feeds)] for every session, so each pair of timings saw the same input.
    `clock` is wall time by default (what a user waits); decisions pass a CPU-time clock (measure.speed).
    With `repeat` > 1 each sample is the mean of that many back-to-back runs (fast models: less noise).
    """
    if not sessions:
        return {}
    if not feeds:
        raise ValueError("time_interleaved needs at least one feed")
    names = list(sessions)
    for turn in range(warmup):  # first runs allocate arenas and pick kernels: not representative
        for name in names:
            sessions[name].run(None, feeds[turn % len(feeds)])
    samples: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(runs):
        feed = feeds[turn % len(feeds)]
        for name in names:
            samples[name].append(_time_block(sessions[name], feed, clock, repeat))
        if progress:
            progress(1)
    return {name: LatencyStats.from_samples(values) for name, values in samples.items()}


def _time_block(session: RunsFeeds, feed: dict, clock: Clock, repeat: int = 1) -> float:
    start = clock()
    for _ in range(repeat):
        session.run(None, feed)
    return (clock() - start) * 1000.0 / repeat


def speedup(baseline: LatencyStats, candidate: LatencyStats) -> Speedup:
    """How many times faster the candidate is; the spread comes from runs paired by turn."""
    ratio = baseline.median_ms / candidate.median_ms if candidate.median_ms > 0 else float("inf")
    pairs = min(len(baseline.samples_ms), len(candidate.samples_ms))
    if pairs == 0:
        return Speedup(ratio, ratio, ratio)
    paired = np.asarray(baseline.samples_ms[:pairs]) / np.maximum(np.asarray(candidate.samples_ms[:pairs]), 1e-9)
    q1, q3 = np.percentile(paired, [25, 75])
    return Speedup(float(ratio), float(q1), float(q3))

"""Speed decisions that the neighbours cannot flip.

A decision times the work itself, not the time a thread waited for a core. At one intra-op thread
onnxruntime runs the whole graph on the calling thread, so that thread's CPU time is the model's cost,
whatever else the machine runs (shared/MEASURED.md: ratios held within 3 % at load 6 on 2 cores, where
wall-clock medians swung 4x). At N threads the pool's workers do part of the work: the process's CPU time,
with idle workers sleeping instead of spinning, counts all of it. Wall clock is what `report` shows; it
never decides here.

Runs alternate (baseline, candidate, baseline, ...) so drifts hit both; turns are added until a
distribution-free interval for the median ratio keeps clear of the decision's thresholds (a clear case
settles in 5 turns, a close call gets up to LONG_RUNS); and a ratio within the noise band of the bar counts
as meeting it, so that two runs of the same command reach the same decision.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from compressq.measure.latency import Clock, LatencyStats, RunsFeeds, time_interleaved
from compressq.memory import give_back_freed_memory
from compressq.runtime import create_session

RUNS = 15
WARMUP = 3
BLOCK_MS = 10.0        # fast models are timed in blocks of back-to-back runs lasting at least this long
MAX_REPEAT = 50
CLOSE_CALL = 0.1
LONG_RUNS = 4 * RUNS   # the most turns one decision takes (a ratio sitting on a threshold)
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


def measure_speedup(baseline: ModelOrPath, candidate: ModelOrPath, feeds: list[dict], provider: str = "cpu",
                    threads: int = 1, runs: int | None = None) -> SpeedMeasurement:
    """How many times less work `candidate` does than `baseline` on `feeds` (never wall clock).

    With `runs` given, exactly that many turns; otherwise turns until the ratio is clear of the decision
    thresholds (SpeedCheck.measure), RUNS at least for the figure.
    """
    check = SpeedCheck(baseline, feeds, provider, threads)
    if runs:
        return check.timed(candidate, runs)
    check.measure(candidate)
    return check.figure(candidate)


@dataclass(frozen=True)
class HeadToHead:
    """Two variants timed in the same interleaved runs as fp32: each against fp32, and one against the other."""

    current: SpeedMeasurement
    candidate: SpeedMeasurement
    candidate_over_current: float   # > 1: the candidate does less work (median of the per-turn quotients)


def meets(ratio: float, bar: float = 1.0) -> bool:
    """A ratio meets the bar when it is at or above it, give or take the noise band."""
    return ratio >= bar - NOISE_TOLERANCE


def convincing(ratio: float) -> bool:
    return ratio >= CONVINCING


def clearly_faster(ratio: float, than: float) -> bool:
    """`ratio` beats `than` by more than the noise band: ties keep what was there (a stable choice)."""
    return ratio > than * (1.0 + NOISE_TOLERANCE)


# ------------------------------------------------------------------------------------------------------
# One speed check per quantize: sessions opened once, turns added until the answer is clear.

MIN_TURNS = 5          # the fewest turns a decision rests on: all 5 on one side of a threshold (sign test, 6 %)
TURNS_PER_LOOK = 5     # turns added between two looks at the evidence
INTERVAL_CONFIDENCE = 0.9
# A printed figure is done when its interval is this narrow (relative to the median: +-3 %), or after RUNS
# turns. bench "loaded" holds printed figures to 10 % of an independent 40-run measurement.
FIGURE_PRECISION = 3 * NOISE_TOLERANCE


def median_interval(values: Sequence[float] | np.ndarray, confidence: float = INTERVAL_CONFIDENCE,
                    ) -> tuple[float, float]:
    """A distribution-free interval for the median (order statistics and the binomial law): no assumption
    about the shape of the noise, which on a busy machine has long tails."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = len(ordered)
    tail = (1.0 - confidence) / 2.0
    below, k = 0.0, 0
    for j in range(n // 2):  # widen while the chance of j or fewer values below the median stays in the tail
        below += _binomial_half(n, j)
        if below > tail:
            break
        k = j + 1
    if k == 0:
        return float("-inf"), float("inf")
    return float(ordered[k - 1]), float(ordered[n - k])


def _binomial_half(n: int, j: int) -> float:
    from math import comb

    return comb(n, j) / 2.0 ** n


def settled(values: Sequence[float] | np.ndarray, thresholds: Sequence[float]) -> bool:
    """The evidence puts the median on one side of every threshold (enough turns to decide)."""
    if len(values) < MIN_TURNS:
        return False
    low, high = median_interval(values)
    return not any(low <= threshold <= high for threshold in thresholds)


@dataclass
class _Pairs:
    """Per-turn (fp32 ms, variant ms) pairs of one variant, pooled over every timing it took part in. The
    variant is held so that its id cannot be reused by another model while its pairs are kept."""

    variant: object
    baseline_ms: list[float]
    variant_ms: list[float]

    def ratios(self) -> np.ndarray:
        return np.asarray(self.baseline_ms) / np.maximum(np.asarray(self.variant_ms), 1e-9)


class SpeedCheck:
    """fp32 against its compressed variants on fixed feeds, for the life of one quantize.

    The fp32 session is opened once and at most two variant sessions are kept (the current one and the
    candidate raced against it). Each timing adds turns of TURNS_PER_LOOK until a distribution-free interval
    for the median keeps clear of the thresholds the decision depends on (never past LONG_RUNS): a 2x variant is
    settled in 5 turns, a close call gets 60 as before. Every turn a variant took part in is pooled, so the
    figure printed for the winner rests on all of them (topped up to RUNS when fewer).
    """

    def __init__(self, baseline: ModelOrPath, feeds: Sequence[dict], provider: str = "cpu", threads: int = 1,
                 *, clock: Clock | None = None, clock_name: str | None = None,
                 open_session: Callable[[ModelOrPath], RunsFeeds] | None = None):
        if clock is None:
            clock, clock_name = decision_clock(threads, provider)
        self.clock, self.clock_name = clock, clock_name or "custom clock"
        self.feeds, self.threads = list(feeds), threads
        self._open = open_session or (lambda model: create_session(model, provider, threads=threads, spinning=False))
        self._baseline = self._open(baseline)
        self._variants: dict[int, tuple[object, RunsFeeds]] = {}   # id -> (model kept alive, session)
        self._pairs: dict[int, _Pairs] = {}
        self._turn = 0
        self._repeat: int | None = None
        # The first input with a samples axis says the batch (a scalar input, e.g. an If's flag, has none).
        first = self.feeds[0] if self.feeds else {}
        self.batch = next((int(v.shape[0]) for v in first.values() if np.ndim(v)), 1)

    def measure(self, variant, thresholds: Sequence[float] = (FASTER_ENOUGH, CONVINCING)) -> SpeedMeasurement:
        """fp32 work / variant work, timed until the ratio is clearly on one side of each threshold."""
        fresh: list[float] = []
        while len(fresh) < LONG_RUNS:
            turns = self._turns([variant], TURNS_PER_LOOK)
            fresh.extend(self._pairs_of(variant).ratios()[-len(turns[0]):])
            if settled(fresh, thresholds):
                break
        return self.figure_so_far(variant)

    def race(self, current, candidate) -> HeadToHead:
        """fp32, `current` and `candidate` in the same turns until `candidate / current` clears the noise band
        (quotients turn by turn: a burst of load that slows one turn slows both variants in it)."""
        quotients: list[float] = []
        while len(quotients) < LONG_RUNS:
            now, then = self._turns([current, candidate], TURNS_PER_LOOK)
            quotients.extend(np.asarray(now) / np.maximum(np.asarray(then), 1e-9))
            if settled(quotients, (1.0 + NOISE_TOLERANCE,)):
                break
        return HeadToHead(self.figure_so_far(current), self.figure_so_far(candidate), float(np.median(quotients)))

    def figure(self, variant) -> SpeedMeasurement:
        """The figure to print: every turn the variant took part in, with turns added until the median is
        known to FIGURE_PRECISION or RUNS turns were taken."""
        while not self._precise(self._pairs_of(variant).ratios()):
            self._turns([variant], TURNS_PER_LOOK)
        return self.figure_so_far(variant)

    @staticmethod
    def _precise(ratios: np.ndarray) -> bool:
        if len(ratios) >= RUNS:
            return True
        if len(ratios) < MIN_TURNS:
            return False
        low, high = median_interval(ratios)
        return high - low <= FIGURE_PRECISION * float(np.median(ratios))

    def timed(self, variant, runs: int) -> SpeedMeasurement:
        """Exactly `runs` more turns, no early stop (benches that want a fixed count)."""
        self._turns([variant], runs)
        return self.figure_so_far(variant)

    def figure_so_far(self, variant) -> SpeedMeasurement:
        pairs = self._pairs_of(variant)
        ratios = pairs.ratios()
        q1, median, q3 = np.percentile(ratios, [25, 50, 75])
        return SpeedMeasurement(float(median), float(q1), float(q3), float(np.median(pairs.baseline_ms)),
                                float(np.median(pairs.variant_ms)), len(ratios), self.threads, self.batch,
                                self.clock_name)

    # -- timing -----------------------------------------------------------------------------------------

    def _turns(self, variants: Sequence, count: int) -> list[list[float]]:
        """`count` more turns of fp32 and `variants`; returns each variant's new milliseconds."""
        opened_before = set(self._variants)
        sessions = {"fp32": self._baseline, **{str(i): self._session(v) for i, v in enumerate(variants)}}
        if self._repeat is None:
            self._repeat = _block_repeat(self._baseline, self.feeds[0], self.clock)
        start = self._turn % len(self.feeds)
        rotated = self.feeds[start:] + self.feeds[:start]
        # A session just opened allocates arenas and picks kernels in its first runs; one run does it for a slow
        # model. Decided by the session, not by the turns kept: a variant evicted and reopened is cold again.
        fresh = any(id(v) not in opened_before for v in variants)
        warmup = (WARMUP if self._repeat > 1 else 1) if fresh else 0
        stats = time_interleaved(sessions, rotated, runs=count, warmup=warmup, clock=self.clock,
                                 repeat=self._repeat)
        self._turn += count
        new = []
        for i, variant in enumerate(variants):
            pairs = self._pairs_of(variant)
            pairs.baseline_ms.extend(stats["fp32"].samples_ms)
            pairs.variant_ms.extend(stats[str(i)].samples_ms)
            new.append(stats[str(i)].samples_ms)
        return new

    def forget(self, variant) -> None:
        """A variant that lost: drop its turns and its session."""
        self._pairs.pop(id(variant), None)
        if self._variants.pop(id(variant), None) is not None:
            give_back_freed_memory()

    def _pairs_of(self, variant) -> _Pairs:
        return self._pairs.setdefault(id(variant), _Pairs(variant, [], []))

    def _session(self, variant) -> RunsFeeds:
        key = id(variant)
        if key in self._variants:
            self._variants[key] = self._variants.pop(key)  # most recently used last
            return self._variants[key][1]
        while len(self._variants) >= 2:  # the current variant and one candidate: sessions hold weights
            del self._variants[next(iter(self._variants))]
        self._variants[key] = (variant, self._open(variant))
        return self._variants[key][1]

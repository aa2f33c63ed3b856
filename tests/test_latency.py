"""Interleaved timing: call order, pairing of feeds, statistics. No assertion depends on real time."""

from __future__ import annotations

import numpy as np
import pytest

from compressq.measure import speed
from compressq.measure.latency import LatencyStats, speedup, time_interleaved


class RecordingSession:
    """Stands in for an InferenceSession: records who ran, on which feed."""

    def __init__(self, name: str, log: list):
        self.name = name
        self.log = log

    def run(self, output_names, input_feed):
        self.log.append((self.name, input_feed["id"]))
        return []


def test_sessions_take_turns_on_the_same_feed():
    log: list = []
    sessions = {name: RecordingSession(name, log) for name in ("A", "B", "C")}
    feeds = [{"id": 0}, {"id": 1}]
    stats = time_interleaved(sessions, feeds, runs=5, warmup=2)
    warmup, timed = log[:6], log[6:]
    assert [name for name, _ in warmup] == ["A", "B", "C"] * 2
    assert [name for name, _ in timed] == ["A", "B", "C"] * 5
    turns = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert [{feed for _, feed in turn} for turn in turns] == [{0}, {1}, {0}, {1}, {0}]
    assert {name: len(s.samples_ms) for name, s in stats.items()} == {"A": 5, "B": 5, "C": 5}


def test_progress_is_reported_once_per_turn():
    steps: list[int] = []
    time_interleaved({"A": RecordingSession("A", [])}, [{"id": 0}], runs=4, warmup=0, progress=steps.append)
    assert steps == [1, 1, 1, 1]


def test_no_feeds_is_an_error_and_no_sessions_is_nothing():
    with pytest.raises(ValueError):
        time_interleaved({"A": RecordingSession("A", [])}, [], runs=1)
    assert time_interleaved({}, [{"id": 0}]) == {}


def test_stats_match_numpy():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    stats = LatencyStats.from_samples(samples)
    assert stats.median_ms == np.median(samples)
    assert stats.p90_ms == pytest.approx(np.percentile(samples, 90))
    assert stats.mean_ms == pytest.approx(np.mean(samples))
    assert stats.throughput(8) == pytest.approx(8 * 1000 / np.median(samples))


def test_speedup_is_the_median_ratio_with_the_paired_spread():
    baseline = LatencyStats.from_samples([4.0, 4.0, 8.0, 4.0])
    candidate = LatencyStats.from_samples([2.0, 1.0, 4.0, 2.0])
    result = speedup(baseline, candidate)
    assert result.ratio == pytest.approx(4.0 / 2.0)
    paired = np.array([2.0, 4.0, 2.0, 2.0])
    assert (result.ratio_q1, result.ratio_q3) == pytest.approx(tuple(np.percentile(paired, [25, 75])))


def test_measure_speedup_opens_both_models_and_times_them_in_turns(monkeypatch):
    # The report passes paths, quantize passes ModelProtos: each reaches create_session as given, baseline first.
    log: list = []
    opened: list = []

    def fake_session(model, *args, **kwargs):
        opened.append(model)
        return RecordingSession(str(model), log)

    monkeypatch.setattr(speed, "create_session", fake_session)
    feeds = [{"id": np.full((3, 2), turn, np.float32)} for turn in range(2)]
    measured = speed.measure_speedup("fp32.onnx", "int8.onnx", feeds, runs=4)
    assert opened == ["fp32.onnx", "int8.onnx"]
    assert log[0][0] == "fp32.onnx" and {name for name, _ in log} == {"fp32.onnx", "int8.onnx"}
    assert sum(name == "fp32.onnx" for name, _ in log) == sum(name == "int8.onnx" for name, _ in log) + 2
    assert (measured.runs, measured.batch, measured.threads) == (4, 3, 1)
    assert measured.clock_name == "calling thread's CPU time"

"""Activation ranges from calibration data, collected batch by batch with streaming observers.

Each observer folds one batch at a time into a fixed-size state (running min/max, or a histogram whose
range widens as batches arrive), so memory does not grow with the number of samples. One onnxruntime
session exposes every tensor the plan needs; each batch's outputs are dropped as soon as they are folded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from compressq.data import Dataset
from compressq.runtime import create_session, with_outputs

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
# What `--method auto` chooses among, per tensor (compressq.quantize.range_search picks by the error caused).
# Entropy is not a candidate: on PP-OCRv4 rec it clipped so hard that no decoded line survived (0 % vs 22 %).
CANDIDATE_METHODS = (("minmax", None), ("percentile", 99.999), ("percentile", 99.99), ("mse", None))
HISTOGRAM_BINS = 2048
# Beyond this magnitude a value is a sentinel (float-min attention masks, -inf padding), not a signal
# that 8 bits could represent next to ordinary activations.
SENTINEL_MAGNITUDE = 1e6


@dataclass(frozen=True)
class TensorRange:
    low: float
    high: float
    finite: bool = True  # False: the tensor carries inf/NaN or sentinel values and must stay float

    def describe(self) -> str:
        return f"[{self.low:.4g}, {self.high:.4g}]" if self.finite else "non-finite or sentinel values"


class MinMaxObserver:
    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf
        self.finite = True

    def update(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high)) or max(abs(low), abs(high)) > SENTINEL_MAGNITUDE:
            self.finite = False
            return
        self.low, self.high = min(self.low, low), max(self.high, high)

    def result(self) -> TensorRange:
        if not self.finite or self.low > self.high:
            return TensorRange(0.0, 0.0, finite=self.finite and self.low <= self.high)
        return TensorRange(self.low, self.high)


class HistogramObserver(MinMaxObserver):
    """A histogram of values over a range that doubles whenever a batch falls outside it."""

    def __init__(self, method: str, percentile: float = 99.999, bins: int = HISTOGRAM_BINS) -> None:
        super().__init__()
        self.method = method
        self.percentile = percentile
        self.bins = bins
        self.counts = np.zeros(bins, np.float64)
        self.edge_low = 0.0
        self.edge_high = 0.0

    def update(self, values: np.ndarray) -> None:
        super().update(values)
        if not self.finite or values.size == 0:
            return
        self._cover(self.low, self.high)
        counts, _ = np.histogram(values, bins=self.bins, range=(self.edge_low, self.edge_high))
        self.counts += counts

    def _cover(self, low: float, high: float) -> None:
        if self.edge_high == self.edge_low:  # first batch: take its range exactly
            self.edge_low, self.edge_high = low, high if high > low else low + 1e-6
            return
        if low >= self.edge_low and high <= self.edge_high:
            return
        new_low, new_high = min(low, self.edge_low), max(high, self.edge_high)
        old_centres = self._centres()
        self.edge_low, self.edge_high = new_low, new_high
        self.counts, _ = np.histogram(old_centres, bins=self.bins, range=(new_low, new_high), weights=self.counts)

    def _centres(self) -> np.ndarray:
        width = (self.edge_high - self.edge_low) / self.bins
        return self.edge_low + (np.arange(self.bins) + 0.5) * width

    def result(self) -> TensorRange:
        base = super().result()
        if not base.finite or self.counts.sum() == 0:
            return base
        choose = {"percentile": self._percentile_range, "entropy": self._entropy_range, "mse": self._mse_range}
        low, high = choose[self.method]()
        return TensorRange(max(low, base.low), min(high, base.high))

    def _percentile_range(self) -> tuple[float, float]:
        cumulative = np.cumsum(self.counts) / self.counts.sum()
        tail = (100.0 - self.percentile) / 100.0
        centres = self._centres()
        low = centres[min(np.searchsorted(cumulative, tail), self.bins - 1)]
        high = centres[min(np.searchsorted(cumulative, 1.0 - tail), self.bins - 1)]
        return float(low), float(high)

    def _candidate_ranges(self, steps: int = 64) -> np.ndarray:
        # Shrink the observed range towards zero; keeps the zero point fixed in relative position.
        fractions = np.linspace(1.0, 0.05, steps)
        return np.stack([self.low * fractions, self.high * fractions], axis=1)

    def _mse_range(self) -> tuple[float, float]:
        errors = [_expected_squared_error(self._centres(), self.counts, low, high)
                  for low, high in self._candidate_ranges()]
        low, high = self._candidate_ranges()[int(np.argmin(errors))]
        return float(low), float(high)

    def _entropy_range(self) -> tuple[float, float]:
        divergences = [_kl_divergence(self._centres(), self.counts, low, high)
                       for low, high in self._candidate_ranges()]
        low, high = self._candidate_ranges()[int(np.argmin(divergences))]
        return float(low), float(high)


def _levels(low: float, high: float, levels: int = 256) -> tuple[float, float]:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (levels - 1) if high > low else 1.0
    return low, scale


def _expected_squared_error(centres: np.ndarray, counts: np.ndarray, low: float, high: float) -> float:
    low, scale = _levels(low, high)
    snapped = np.clip(np.rint((centres - low) / scale), 0, 255) * scale + low
    return float(np.sum(counts * (centres - snapped) ** 2))


def _kl_divergence(centres: np.ndarray, counts: np.ndarray, low: float, high: float) -> float:
    """KL(P || Q) where Q is P after 8-bit quantization over [low, high] (clipped mass joins the ends)."""
    low, scale = _levels(low, high)
    level = np.clip(np.rint((centres - low) / scale), 0, 255).astype(np.int64)
    mass_per_level = np.bincount(level, weights=counts, minlength=256)
    bins_per_level = np.bincount(level, weights=(counts > 0).astype(np.float64), minlength=256)
    spread = np.where(bins_per_level[level] > 0, mass_per_level[level] / np.maximum(bins_per_level[level], 1), 0)
    p = counts / counts.sum()
    q = np.where(counts > 0, spread, 0) / max(spread[counts > 0].sum(), 1e-12)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


class CandidatesObserver(HistogramObserver):
    """One histogram, every candidate range of CANDIDATE_METHODS from it: {"minmax": ..., "p99.99": ...}."""

    def __init__(self) -> None:
        super().__init__("mse")

    def candidates(self) -> dict[str, TensorRange]:
        base = MinMaxObserver.result(self)
        if not base.finite or self.counts.sum() == 0:
            return {"minmax": base}
        found: dict[str, TensorRange] = {}
        for method, percentile in CANDIDATE_METHODS:
            self.method, self.percentile = method, percentile or self.percentile
            label = f"p{percentile:g}" if method == "percentile" else method
            found[label] = base if method == "minmax" else HistogramObserver.result(self)
        return found


def make_observer(method: str, percentile: float) -> MinMaxObserver:
    if method == "auto":
        return CandidatesObserver()
    return MinMaxObserver() if method == "minmax" else HistogramObserver(method, percentile)


def collect_ranges(
    model: onnx.ModelProto,
    dataset: Dataset,
    tensor_names: Iterable[str],
    *,
    method: str = "minmax",
    percentile: float = 99.999,
    batch_size: int = 32,
    samples: int | None = None,
    provider: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, TensorRange]:
    """Run the model once over the data and return the range of every requested tensor."""
    names = sorted(set(tensor_names))
    if not names:
        return {}
    session = create_session(with_outputs(model, names), provider)
    observers = {name: make_observer(method, percentile) for name in names}
    for feed in dataset.batches(batch_size, samples):
        for name, values in zip(names, session.run(names, feed)):
            observers[name].update(values)
        if progress:
            progress(next(iter(feed.values())).shape[0])
    return {name: observer.result() for name, observer in observers.items()}


def collect_range_candidates(model: onnx.ModelProto, dataset: Dataset, tensor_names: Iterable[str], *,
                             batch_size: int = 32, samples: int | None = None,
                             progress: Callable[[int], None] | None = None) -> dict[str, dict[str, TensorRange]]:
    """One pass; per tensor, every candidate range of CANDIDATE_METHODS (one entry when it is not finite)."""
    names = sorted(set(tensor_names))
    if not names:
        return {}
    session = create_session(with_outputs(model, names))
    observers = {name: CandidatesObserver() for name in names}
    for feed in dataset.batches(batch_size, samples):
        for name, values in zip(names, session.run(names, feed)):
            observers[name].update(values)
        if progress:
            progress(next(iter(feed.values())).shape[0])
    return {name: observer.candidates() for name, observer in observers.items()}

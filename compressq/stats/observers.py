"""Streaming reducers: each folds one batch at a time into a fixed-size state (`update(batch)`, `result()`).

No observer keeps activations: memory is flat in the number of samples. Observers whose statistic can be
reduced inside the graph say so (`reduction`); compressq.stats.collect then adds the reduction nodes and
hands the observer only their tiny results (`update_reduced`). Every observer also accepts the whole tensor
(`update`), the path used for tensors the graph cannot reduce (unknown type or rank) and in tests: both
paths give the same statistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HISTOGRAM_BINS = 2048
# Beyond this magnitude a value is a sentinel (float-min attention masks, -inf padding), not a signal
# that 8 bits could represent next to ordinary activations.
SENTINEL_MAGNITUDE = 1e6
# What `--method auto` chooses among, per tensor (compressq.quantize.range_search picks by the error caused).
# Entropy is not a candidate: on PP-OCRv4 rec it clipped so hard that no decoded line survived (0 % vs 22 %).
CANDIDATE_METHODS = (("minmax", None), ("percentile", 99.999), ("percentile", 99.99), ("mse", None))
# np.histogram allocates several float64 temporaries per element: binning a fetched tensor in slices of
# this many values keeps that overhead small next to the tensor itself (the counts do not change).
HISTOGRAM_SLICE = 1 << 20


@dataclass(frozen=True)
class TensorRange:
    low: float
    high: float
    finite: bool = True  # False: the tensor carries inf/NaN or sentinel values and must stay float

    def describe(self) -> str:
        return f"[{self.low:.4g}, {self.high:.4g}]" if self.finite else "non-finite or sentinel values"


@dataclass(frozen=True)
class Reduction:
    """What collect adds to the graph for one observer: `kind` over every axis but `axis` (None: all axes)."""

    kind: str               # "minmax" (ReduceMin + ReduceMax) | "sum" (ReduceSum + Size) | "rows" (the values)
    axis: int | None = None


class MinMaxObserver:
    """The global range of a tensor; a tensor with inf/NaN or sentinel values is marked not finite."""

    reduction: Reduction | None = Reduction("minmax")

    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf
        self.finite = True

    def update(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        self.update_reduced(values.min(), values.max())

    def update_reduced(self, low, high) -> None:
        low, high = float(low), float(high)
        if not (np.isfinite(low) and np.isfinite(high)) or max(abs(low), abs(high)) > SENTINEL_MAGNITUDE:
            self.finite = False
            return
        self.low, self.high = min(self.low, low), max(self.high, high)

    def result(self) -> TensorRange:
        if not self.finite or self.low > self.high:
            return TensorRange(0.0, 0.0, finite=self.finite and self.low <= self.high)
        return TensorRange(self.low, self.high)


class SumObserver:
    """The sum of every value of a tensor over the data, in float64 (e.g. a graph's own per-batch error sums)."""

    reduction: Reduction | None = Reduction("sum")

    def __init__(self) -> None:
        self.total = 0.0

    def update(self, values: np.ndarray) -> None:
        self.total += float(np.sum(values, dtype=np.float64))

    def update_reduced(self, total, size) -> None:
        self.total += float(total)

    def result(self) -> float:
        return self.total


class FirstRowsObserver:
    """The values of the first `limit` samples (rows of the samples axis), in order: a graph output's fp32
    values kept from the calibration pass, so that no second fp32 pass is needed to compare against them.
    A run whose values have no samples axis of the run's size makes the rows unusable (`result()` None)."""

    reduction: Reduction | None = Reduction("rows")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[np.ndarray] = []
        self.kept = 0
        self.usable = True

    def update_reduced(self, values: np.ndarray, rows: int) -> None:
        if not self.usable or self.kept >= self.limit:
            return
        if values.ndim == 0 or values.shape[0] != rows:
            self.usable = False
            return
        part = np.array(values[: self.limit - self.kept])  # a copy: onnxruntime reuses nothing, but be safe
        self.parts.append(part)
        self.kept += len(part)

    def result(self) -> np.ndarray | None:
        if not self.usable or not self.parts:
            return None
        return np.concatenate(self.parts)


class HistogramObserver(MinMaxObserver):
    """A histogram of values over a range that widens (keeping its bin count) whenever a batch falls outside.

    collect() first finds each tensor's exact range (in the graph) and `fix_range`s it, so the second pass
    bins every value once into the final bins: no re-binning, and the counts do not depend on the batching.
    """

    reduction = None  # the values themselves are needed

    def __init__(self, method: str, percentile: float = 99.999, bins: int = HISTOGRAM_BINS) -> None:
        super().__init__()
        self.method = method
        self.percentile = percentile
        self.bins = bins
        self.counts = np.zeros(bins, np.float64)
        self.edge_low = 0.0
        self.edge_high = 0.0

    def fix_range(self, observed: MinMaxObserver) -> None:
        """Start from a range already measured over all the data (values binned later fall inside it)."""
        self.low, self.high, self.finite = observed.low, observed.high, observed.finite
        if self.finite and self.low <= self.high:
            self._cover(self.low, self.high)

    def update(self, values: np.ndarray) -> None:
        super().update(values)
        if not self.finite or values.size == 0:
            return
        self._cover(self.low, self.high)
        flat = values.reshape(-1)
        for start in range(0, flat.size, HISTOGRAM_SLICE):
            counts, _ = np.histogram(flat[start:start + HISTOGRAM_SLICE], bins=self.bins,
                                     range=(self.edge_low, self.edge_high))
            self.counts += counts

    def _cover(self, low: float, high: float) -> None:
        if self.edge_high == self.edge_low:  # first batch: take its range exactly
            # A constant tensor still needs bins that float32 can tell apart (results clip to [low, high]).
            self.edge_low, self.edge_high = low, high if high > low else low + max(1e-6, abs(low) * 1e-3)
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
        low = centres[min(int(np.searchsorted(cumulative, tail)), self.bins - 1)]
        high = centres[min(int(np.searchsorted(cumulative, 1.0 - tail)), self.bins - 1)]
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

    def result(self) -> dict[str, TensorRange]:  # type: ignore[override]
        return self.candidates()


def range_observer(method: str, percentile: float = 99.999) -> MinMaxObserver:
    """The observer behind a calibration method (minmax | percentile | entropy | mse | auto)."""
    if method == "auto":
        return CandidatesObserver()
    return MinMaxObserver() if method == "minmax" else HistogramObserver(method, percentile)


class ChannelAbsMaxObserver:
    """max |x| per channel (`axis`, the last by default): max(|max|, |min|) of per-channel ranges."""

    def __init__(self, axis: int = -1) -> None:
        self.reduction = Reduction("minmax", axis)
        self.axis = axis
        self.absmax: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        rows = _channels_last(values, self.axis)
        if rows.shape[0] == 0:
            return
        self.update_reduced(rows.min(axis=0), rows.max(axis=0))

    def update_reduced(self, low: np.ndarray, high: np.ndarray) -> None:
        batch = np.maximum(np.abs(np.asarray(low)), np.abs(np.asarray(high))).reshape(-1).astype(np.float32)
        self.absmax = batch if self.absmax is None else np.maximum(self.absmax, batch)

    def result(self) -> np.ndarray | None:
        return self.absmax


class ChannelMeanObserver:
    """Mean per channel (`axis`): running float64 sums of per-channel sums and the count behind them."""

    def __init__(self, axis: int = -1) -> None:
        self.reduction = Reduction("sum", axis)
        self.axis = axis
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        rows = _channels_last(values, self.axis).astype(np.float64)
        self._add(rows.sum(axis=0), rows.shape[0])

    def update_reduced(self, sums: np.ndarray, size) -> None:
        sums = np.asarray(sums, np.float64).reshape(-1)
        self._add(sums, int(size) // max(sums.size, 1))

    def _add(self, sums: np.ndarray, count: int) -> None:
        self.total = sums if self.total is None else self.total + sums
        self.count += count

    def result(self) -> np.ndarray | None:
        return None if self.total is None else self.total / max(self.count, 1)


def _channels_last(values: np.ndarray, axis: int) -> np.ndarray:
    """[rows, channels] view of `values` with `axis` as the channels."""
    axis = axis if axis >= 0 else values.ndim + axis
    return np.moveaxis(values, axis, -1).reshape(-1, values.shape[axis])


class GramObserver:
    """H = X^T X [K, K] of a tensor's rows (the last axis is the feature axis K), accumulated in float64:
    the statistic behind least-squares weight reconstruction (compressq.quantize.gptq). Memory is K x K
    whatever the number of samples. Each slice of GRAM_SLICE_ROWS rows is multiplied in float32 (BLAS;
    relative error ~1e-6 per slice, half the work of float64), the running sum is float64."""

    reduction = None  # the rows themselves are needed (a K x K product per batch)

    def __init__(self) -> None:
        self.gram: np.ndarray | None = None
        self.rows = 0
        self.finite = True

    def update(self, values: np.ndarray) -> None:
        if values.ndim == 0 or values.size == 0:
            return
        rows = values.reshape(-1, values.shape[-1])
        if self.gram is None:
            self.gram = np.zeros((rows.shape[1], rows.shape[1]))
        for start in range(0, rows.shape[0], GRAM_SLICE_ROWS):
            part = np.ascontiguousarray(rows[start:start + GRAM_SLICE_ROWS], np.float32)
            if not np.all(np.isfinite(part)):
                self.finite = False
                return
            self.gram += part.T @ part
        self.rows += rows.shape[0]

    def result(self) -> np.ndarray | None:
        return self.gram if self.finite and self.rows else None


GRAM_SLICE_ROWS = 4096


@dataclass(frozen=True)
class ConvGeometry:
    """What a 2-D Conv reads of its input: kernel, strides, dilations and pads (top, left, bottom, right)."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)


class PatchGramObserver(GramObserver):
    """X^T X of a 2-D Conv's input patches (im2col rows [positions, C x kh x kw], channel-major like the
    Conv weight reshaped to [Cout, K]), for the weight reconstruction of convolutions.

    A feature map has many positions: at most PATCH_ROWS_PER_SAMPLE of them are taken per sample (drawn
    with a fixed seed, so the statistic is the same run to run), and only those patches are formed."""

    def __init__(self, geometry: ConvGeometry, rows_per_sample: int | None = None) -> None:
        super().__init__()
        self.geometry = geometry
        self.rows_per_sample = rows_per_sample or PATCH_ROWS_PER_SAMPLE
        self.rng = np.random.default_rng(0)

    def update(self, values: np.ndarray) -> None:
        if values.ndim != 4 or values.size == 0:
            return
        for sample in values:
            super().update(self._patches(sample))

    def _patches(self, sample: np.ndarray) -> np.ndarray:
        (kh, kw), (sh, sw), (dh, dw) = self.geometry.kernel, self.geometry.strides, self.geometry.dilations
        top, left, bottom, right = self.geometry.pads
        padded = np.pad(sample, ((0, 0), (top, bottom), (left, right)))
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        out_h = (padded.shape[1] - span_h) // sh + 1
        out_w = (padded.shape[2] - span_w) // sw + 1
        if out_h <= 0 or out_w <= 0:
            return np.zeros((0, sample.shape[0] * kh * kw), sample.dtype)
        positions = np.arange(out_h * out_w)
        if len(positions) > self.rows_per_sample:
            positions = np.sort(self.rng.choice(positions, self.rows_per_sample, replace=False))
        rows_at, cols_at = (positions // out_w) * sh, (positions % out_w) * sw
        taps_h, taps_w = np.arange(kh) * dh, np.arange(kw) * dw
        # [C, positions, kh, kw] gathered directly: no full im2col matrix of the map
        row_index = rows_at[:, None, None] + taps_h[None, :, None]
        col_index = cols_at[:, None, None] + taps_w[None, None, :]
        patches = padded[:, row_index, col_index]
        return patches.transpose(1, 0, 2, 3).reshape(len(positions), -1)


PATCH_ROWS_PER_SAMPLE = 1024


class RowReservoir:
    """A uniform sample of `size` rows (the last axis is a row's width) of a tensor over the data, by Algorithm
    R: after n rows, each of them is among the kept with the same chance size / n (re-drawing from the pool at
    every batch would keep the last batches' rows)."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.pool: np.ndarray | None = None
        self.seen = 0
        self.rng = rng

    def update(self, values: np.ndarray) -> None:
        self.add(finite_rows(values))

    def add(self, rows: np.ndarray) -> None:
        if self.pool is None:
            self.pool = np.empty((self.size, rows.shape[1]), rows.dtype)
        size = self.size
        room = max(0, min(size - self.seen, len(rows)))
        self.pool[self.seen:self.seen + room] = rows[:room]
        self.seen += room
        rest = rows[room:]
        if not len(rest):
            return
        positions = self.seen + 1 + np.arange(len(rest))  # 1-based index of each new row among all rows seen
        slots = np.floor(self.rng.random(len(rest)) * positions).astype(np.int64)
        for row, slot in zip(rest[slots < size], slots[slots < size]):  # in order: a later row replaces an earlier
            self.pool[slot] = row
        self.seen += len(rest)

    def result(self) -> np.ndarray | None:
        """The kept rows [min(seen, size), width]; None before any row."""
        return None if self.pool is None else self.pool[: min(self.seen, self.size)]


def finite_rows(values: np.ndarray) -> np.ndarray:
    """The rows [n, width] of a tensor (its last axis is a row) whose values are all finite: a row that
    overflowed (inf from an fp16 model, a -inf mask) says nothing a least-squares fit could use."""
    rows = values.reshape(-1, values.shape[-1])
    finite = np.isfinite(rows).all(axis=1)
    return rows if finite.all() else rows[finite]

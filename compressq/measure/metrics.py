"""Accuracy and agreement metrics on arrays (pure numpy), plus streaming reducers built on them.

Every metric takes arrays whose first axis is samples. The streaming `OutputAgreement` keeps a handful
of running sums per output instead of the outputs themselves, so memory stays flat in the number of
samples (STYLE.md: statistics as streaming reducers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# SQNR of two identical tensors is infinite; JSON has no infinity, so clip to a value that reads as
# "exact" and still sorts correctly.
SQNR_CAP_DB = 200.0
_TINY = 1e-30


def _flat(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64).reshape(-1)


def _class_predictions(logits: np.ndarray) -> np.ndarray:
    return np.argmax(np.asarray(logits), axis=-1)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose arg-max class equals the label (labels: [samples] integer classes)."""
    return top_k_accuracy(logits, labels, 1)


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of samples whose label is among the k highest scores."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[-1])
    # argpartition finds the k best without sorting all classes (cheap for large vocabularies).
    best = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    return float(np.mean(np.any(best == labels[:, None], axis=-1)))


def top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many samples of this batch are correct at top-k (for streaming accumulation)."""
    return int(round(top_k_accuracy(logits, labels, k) * len(np.asarray(labels).reshape(-1))))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of samples whose predicted class is the same in both outputs.

    Rank-2 [samples, classes]: one class per sample. Higher rank (e.g. [samples, positions, classes]):
    a sample agrees only when every position's arg-max matches, which is what a tagger's user sees.
    """
    return float(np.mean(_agreeing_samples(a, b)))


def _agreeing_samples(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _equal_samples(_class_predictions(a), _class_predictions(b))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between the two outputs flattened to vectors (1.0 = same direction)."""
    x, y = _flat(a), _flat(b)
    noise = x - y
    return _cosine_from_sums(float(np.dot(x, y)), float(np.dot(x, x)), float(np.dot(y, y)),
                             float(np.dot(noise, noise)))


def _cosine_from_sums(dot: float, energy_a: float, energy_b: float, noise_energy: float) -> float:
    norms = float(np.sqrt(energy_a * energy_b))
    if norms < _TINY:  # an all-zero output: the angle is undefined, equality is not
        return 1.0 if noise_energy <= _TINY else 0.0
    return float(np.clip(dot / norms, -1.0, 1.0))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|reference|^2 / |reference - test|^2)."""
    ref = _flat(reference)
    noise = ref - _flat(test)
    return _sqnr_from_energies(float(np.dot(ref, ref)), float(np.dot(noise, noise)))


def _sqnr_from_energies(signal: float, noise: float) -> float:
    if noise <= _TINY:
        return SQNR_CAP_DB
    if signal <= _TINY:
        return -SQNR_CAP_DB
    return float(min(SQNR_CAP_DB, 10.0 * np.log10(signal / noise)))


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    x, y = _flat(a), _flat(b)
    return float(np.max(np.abs(x - y))) if x.size else 0.0


def exact_match(a: np.ndarray, b: np.ndarray) -> float:
    """Share of samples whose values (integer labels) are all equal in both outputs."""
    return float(np.mean(_equal_samples(a, b)))


def _equal_samples(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    same = np.asarray(np.asarray(a) == np.asarray(b))
    return np.all(same.reshape(same.shape[0], -1), axis=1) if same.ndim > 1 else same


# ---------------------------------------------------------------------------------------------------
# Streaming reducers

ARGMAX = "argmax"  # class scores: the predicted class is the arg-max of the last axis
EXACT = "exact"    # integer labels: the values themselves are the prediction


@dataclass
class AgreementResult:
    cosine: float  # NaN when a value is not finite (see non_finite): no figure can stand in for it
    sqnr_db: float
    max_abs_error: float
    agreement: float | None  # share of samples whose prediction matches (ARGMAX or EXACT); None otherwise
    samples: int
    non_finite: int = 0  # values NaN in either output, or infinite in only one of them (or with other sign)


class OutputAgreement:
    """Streams batches of (reference, test) outputs and keeps only sums: flat memory in samples.

    `agreement` says how a prediction is read from the output (ARGMAX, EXACT) or None for no agreement
    figure; which one an output gets is decided by compressq.measure.task, never guessed here.
    Infinities at the same place with the same sign agree exactly; any other non-finite value is counted
    and makes every figure NaN, so that an all-NaN output never reads as "SQNR 200 dB".
    """

    def __init__(self, agreement: str | None = None) -> None:
        self.dot = self.reference_energy = self.test_energy = self.noise_energy = 0.0
        self.max_error = 0.0
        self.samples = 0
        self.agreeing = 0
        self.non_finite = 0
        self.mode = agreement

    def update(self, reference: np.ndarray, test: np.ndarray) -> None:
        ref, got = _flat(reference), _flat(test)
        if ref.shape != got.shape:
            raise ValueError(f"output shapes differ: {np.shape(reference)} vs {np.shape(test)}")
        finite = np.isfinite(ref) & np.isfinite(got)
        if not finite.all():
            same_infinity = ~finite & (ref == got)  # NaN never equals NaN
            self.non_finite += int(np.count_nonzero(~(finite | same_infinity)))
            ref, got = ref[finite], got[finite]
        noise = ref - got
        self.dot += float(np.dot(ref, got))
        self.reference_energy += float(np.dot(ref, ref))
        self.test_energy += float(np.dot(got, got))
        self.noise_energy += float(np.dot(noise, noise))
        self.max_error = max(self.max_error, float(np.max(np.abs(noise))) if noise.size else 0.0)
        self._update_predictions(np.asarray(reference), np.asarray(test))

    def _update_predictions(self, reference: np.ndarray, test: np.ndarray) -> None:
        self.samples += reference.shape[0] if reference.ndim else 1
        if self.mode == ARGMAX:
            self.agreeing += int(np.sum(_agreeing_samples(reference, test)))
        elif self.mode == EXACT:
            self.agreeing += int(np.sum(_equal_samples(reference, test)))

    def result(self) -> AgreementResult:
        agreement = self.agreeing / self.samples if self.mode and self.samples else None
        if self.non_finite:
            nan = float("nan")
            return AgreementResult(nan, nan, nan, agreement, self.samples, self.non_finite)
        cosine = _cosine_from_sums(self.dot, self.reference_energy, self.test_energy, self.noise_energy)
        return AgreementResult(cosine, _sqnr_from_energies(self.reference_energy, self.noise_energy),
                               self.max_error, agreement, self.samples)


class TopKCounter:
    """Streams (logits, labels) batches and counts top-k hits."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        self.ks = ks
        self.hits = dict.fromkeys(ks, 0)
        self.samples = 0

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        for k in self.ks:
            self.hits[k] += top_k_hits(logits, labels, k)
        self.samples += len(np.asarray(labels).reshape(-1))

    def accuracy(self, k: int) -> float:
        return self.hits[k] / self.samples if self.samples else float("nan")

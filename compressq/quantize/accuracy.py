"""Accuracy against fp32 on evaluation data: per-node sensitivity and the accuracy-driven fallback.

The fp32 reference outputs are computed once and kept (evaluation sets are small next to calibration
sets), so every candidate costs one pass of the candidate only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from compressq.data import Dataset
from compressq.errors import DataError, TargetNotMet
from compressq.evaluate.metrics import OutputAgreement, is_class_output
from compressq.runtime import create_session

EVAL_BATCH = 64


@dataclass(frozen=True)
class Figures:
    """How close a candidate is to fp32: the numbers the targets and the sensitivity table use."""

    agreement: float | None      # share of samples whose class prediction matches fp32 on every output
    accuracy: float | None       # top-1 against labels (first class output)
    reference_accuracy: float | None
    min_cosine: float            # worst output's cosine similarity to fp32
    min_sqnr_db: float

    @property
    def drop_points(self) -> float | None:
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return 100.0 * (self.reference_accuracy - self.accuracy)

    def to_dict(self) -> dict:
        return {**asdict(self), "drop_points": self.drop_points}


class AccuracyProbe:
    """fp32 outputs of an evaluation set, and the figures of any candidate against them."""

    def __init__(self, reference: onnx.ModelProto, dataset: Dataset, limit: int | None = None):
        self.dataset = dataset
        session = create_session(reference)
        self.feeds_and_outputs = [(feed, session.run(None, feed)) for feed in dataset.batches(EVAL_BATCH, limit)]
        self.samples = sum(next(iter(feed.values())).shape[0] for feed, _ in self.feeds_and_outputs)
        self.labels = dataset.labels(limit)
        self.reference_accuracy = self._accuracy([outputs for _, outputs in self.feeds_and_outputs])

    def measure(self, candidate: onnx.ModelProto) -> Figures:
        session = create_session(candidate)
        candidate_outputs = [session.run(None, feed) for feed, _ in self.feeds_and_outputs]
        agreements = [OutputAgreement() for _ in candidate_outputs[0]]
        for (_, reference), outputs in zip(self.feeds_and_outputs, candidate_outputs):
            for tracker, ref, got in zip(agreements, reference, outputs):
                tracker.update(ref, got)
        results = [a.result() for a in agreements]
        class_agreements = [r.top1_agreement for r in results if r.top1_agreement is not None]
        return Figures(
            agreement=min(class_agreements) if class_agreements else None,
            accuracy=self._accuracy(candidate_outputs),
            reference_accuracy=self.reference_accuracy,
            min_cosine=min(r.cosine for r in results),
            min_sqnr_db=min(r.sqnr_db for r in results),
        )

    def _accuracy(self, outputs_per_batch: list[list[np.ndarray]]) -> float | None:
        if self.labels is None:
            return None
        first = next((i for i, out in enumerate(outputs_per_batch[0]) if is_class_output(out.shape)), None)
        if first is None:
            return None
        predictions = np.concatenate([batch[first].argmax(axis=-1) for batch in outputs_per_batch])
        labels = self.labels.reshape(predictions.shape)
        return float(np.mean(np.all((predictions == labels).reshape(len(predictions), -1), axis=1)))


@dataclass(frozen=True)
class AccuracyTarget:
    """`--max-drop POINTS` (needs labels) or `--min-agreement FRACTION` against fp32."""

    max_drop: float | None = None
    min_agreement: float | None = None

    def check(self, probe: AccuracyProbe) -> None:
        if self.max_drop is not None and probe.reference_accuracy is None:
            raise DataError("--max-drop needs labels in the evaluation data",
                            hint="add a 'labels' array to --eval-data, or use --min-agreement")

    def met(self, figures: Figures) -> bool:
        if self.max_drop is not None and (figures.drop_points is None or figures.drop_points > self.max_drop):
            return False
        return not (self.min_agreement is not None
                    and (figures.agreement is None or figures.agreement < self.min_agreement))

    def describe(self, figures: Figures) -> str:
        parts = []
        if self.max_drop is not None:
            parts.append(f"top-1 drop {figures.drop_points:.2f} points (target <= {self.max_drop})")
        if self.min_agreement is not None:
            agreement = "n/a" if figures.agreement is None else f"{figures.agreement:.4f}"
            parts.append(f"agreement {agreement} (target >= {self.min_agreement})")
        return ", ".join(parts)


@dataclass(frozen=True)
class NodeSensitivity:
    node: str
    op_type: str
    figures: Figures

    def badness(self) -> tuple:
        """Sort key, worst first: lower agreement, then lower cosine."""
        agreement = self.figures.agreement if self.figures.agreement is not None else 1.0
        return (agreement, self.figures.min_cosine)


def node_sensitivity(quantizer, probe: AccuracyProbe, keep_float: dict[str, str],
                     progress: Callable[[str, int, int], None] | None = None) -> list[NodeSensitivity]:
    """Quantize each quantizable node alone (same calibration) and measure it; worst first."""
    candidates = quantizer.fused_attempt(keep_float).plan.compute
    results = []
    for done, (name, compute) in enumerate(candidates.items(), start=1):
        others = {other: "sensitivity: measured alone" for other in candidates if other != name}
        alone = quantizer.attempt({**keep_float, **others})
        results.append(NodeSensitivity(name, compute.op_type, probe.measure(alone.model)))
        if progress:
            progress("measuring sensitivity", done, len(candidates))
    return sorted(results, key=NodeSensitivity.badness)


@dataclass
class AccuracyFallback:
    """The accuracy-driven loop: return the most sensitive nodes to float until the target is met."""

    target: AccuracyTarget
    probe: AccuracyProbe
    progress: Callable[[str, int, int], None] | None = None
    final_figures: Figures | None = None
    returned_to_float: list[str] | None = None

    def enforce(self, quantizer, current, steps: list[str]):
        self.target.check(self.probe)
        figures = self.probe.measure(current.model)
        steps.append(f"accuracy before fallback: {self.target.describe(figures)}")
        self.returned_to_float = []
        if not self.target.met(figures):
            ranking = node_sensitivity(quantizer, self.probe, current.keep_float, self.progress)
            for entry in ranking:
                reason = f"returned to float to meet the accuracy target (sensitivity rank " \
                         f"{len(self.returned_to_float) + 1})"
                current = quantizer.fused_attempt({**current.keep_float, entry.node: reason})
                self.returned_to_float.append(entry.node)
                figures = self.probe.measure(current.model)
                if self.target.met(figures) or not current.plan.compute:
                    break
        self.final_figures = figures
        steps.append(f"accuracy after fallback ({len(self.returned_to_float)} nodes back to float): "
                     f"{self.target.describe(figures)}")
        if not self.target.met(figures):
            raise TargetNotMet(f"accuracy target missed even with every quantizable node in float: "
                               f"{self.target.describe(figures)}",
                               hint="check the evaluation data, or loosen --max-drop / --min-agreement")
        if quantizer.config.speed_check and current.plan.compute:
            current.speedup = quantizer.speedup(current.model)
            if current.speedup < 1.0:
                raise TargetNotMet(f"the accuracy target is met only by a model slower than fp32 "
                                   f"({current.speedup:.2f}x with {len(self.returned_to_float)} nodes back in float)",
                                   hint="quantization does not pay off for this model at this accuracy target")
        return current

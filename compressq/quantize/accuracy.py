"""Accuracy against fp32 on evaluation data: per-node sensitivity and the accuracy-driven fallback.

The fp32 reference outputs are computed once and kept (evaluation sets are small next to calibration
sets), so every candidate costs one pass of the candidate only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from compressq.data import Dataset
from compressq.errors import DataError, TargetNotMet
from compressq.io import holds_mapped_weights, on_disk
from compressq.measure.speed import meets
from compressq.measure.task import (
    LABELS,
    OutputRole,
    TaskScorer,
    correct_samples,
    label_output,
    non_finite_outputs,
    roles_for_batch,
    worst_agreement,
    worst_cosine,
    worst_sqnr,
)
from compressq.quantize.recovery import NodeError, SearchStep, fewest_in_float, node_errors
from compressq.runtime import create_session

# Small batches let a search stop a failing candidate early (AccuracyTarget.out_of_reach): on PP-OCRv4 rec
# most candidates fail within the first batch. Figures are sums over samples: the batch changes none of them.
EVAL_BATCH = 8
RECOVERY_SAMPLES = 64  # calibration samples the one-pass error measurement reads
SEARCH_BUDGET_FLOOR = 6


@dataclass(frozen=True)
class Figures:
    """How close a candidate is to fp32 on the outputs that carry the task (compressq.measure.task)."""

    agreement: float | None      # worst task output's top-1 agreement (class scores) or exact match (labels)
    accuracy: float | None       # against labels, read from the output that predicts them
    reference_accuracy: float | None
    min_cosine: float | None     # worst task output (a detector head: worst slice); NaN: values not finite
    min_sqnr_db: float | None
    agreement_output: str | None = None  # where the agreement was worst: "logits (class scores)"
    cosine_output: str | None = None     # where the cosine was worst: "output0[4:84] (class scores)"
    task_outputs: tuple[str, ...] = ()   # what was scored: "probabilities (class scores)", "label (labels)"
    non_finite: int = 0                  # NaN or unmatched infinite values in the task outputs
    samples_scored: int | None = None    # fewer than the probe holds: stopped once the target was out of reach

    @property
    def drop_points(self) -> float | None:
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return 100.0 * (self.reference_accuracy - self.accuracy)

    def to_dict(self) -> dict:
        return {**asdict(self), "task_outputs": list(self.task_outputs), "drop_points": self.drop_points}


class AccuracyProbe:
    """fp32 outputs of an evaluation set, and the figures of any candidate against them.

    `task_outputs` (`--task-output NAME`) names the outputs that carry the task; empty: the rule decides.
    """

    def __init__(self, reference: onnx.ModelProto, dataset: Dataset, limit: int | None = None,
                 task_outputs: Sequence[str] = (), batch_size: int = EVAL_BATCH, provider: str = "cpu",
                 reference_outputs: Mapping[str, np.ndarray] | None = None):
        """`reference_outputs` (every output's fp32 values for the first samples, in order, e.g. read in the
        calibration pass) spares the fp32 run; without it the reference model runs once over the data."""
        self.dataset = dataset
        self.stop_for: AccuracyTarget | None = None  # see stopping_early
        self.provider = provider  # fp32 and candidates run where the user serves them (--provider)
        if reference_outputs is not None:
            self.output_names = [o.name for o in reference.graph.output]
            self.feeds_and_outputs = _cut_into_batches(dataset.batches(batch_size, limit), reference_outputs)
        else:
            with _session(reference, provider) as session:
                self.output_names = [o.name for o in session.get_outputs()]
                self.feeds_and_outputs = [(feed, self._run(session, feed))
                                          for feed in dataset.batches(batch_size, limit)]
        # Stack layout feeds one complete sample at a time (a scalar input has no samples axis to count).
        self.samples = sum(self._count(feed) for feed, _ in self.feeds_and_outputs)
        first_feed, first_outputs = self.feeds_and_outputs[0]
        self.roles = roles_for_batch(reference, first_feed, first_outputs, task_outputs)
        self.labels = dataset.labels(limit)
        self.label_role: OutputRole | None = None
        if self.labels is not None:
            shapes = {name: value.shape[1:] for name, value in first_outputs.items()}
            self.label_role = label_output(self.roles, shapes, self.labels.shape[1:])
        self.reference_accuracy = self._accuracy([outputs for _, outputs in self.feeds_and_outputs])

    def _run(self, session, feed: dict) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, session.run(self.output_names, feed)))

    @contextmanager
    def stopping_early(self, target: AccuracyTarget) -> Iterator[None]:
        """Within: measure() stops after the first batch that puts `target` out of reach, so a failing candidate
        of a search costs a fraction of a full pass (its figures then cover `samples_scored` samples)."""
        self.stop_for = target
        try:
            yield
        finally:
            self.stop_for = None

    def measure(self, candidate: onnx.ModelProto) -> Figures:
        with _session(candidate, self.provider) as session:
            return self._measure(session)

    def _measure(self, session) -> Figures:
        target = self.stop_for
        scorer = TaskScorer(self.roles)
        candidate_outputs: list[dict[str, np.ndarray]] = []
        scored = 0
        for feed, reference in self.feeds_and_outputs:
            outputs = self._run(session, feed)
            scorer.update(reference, outputs)
            candidate_outputs.append(outputs)
            scored += self._count(feed)
            if target is not None and scored < self.samples:
                figures = self._figures(scorer, candidate_outputs, scored)
                if target.out_of_reach(figures, scored, self.samples):
                    return figures
        return self._figures(scorer, candidate_outputs, scored)

    def _count(self, feed: dict) -> int:
        return self.dataset.samples_in(feed)

    def _figures(self, scorer: TaskScorer, candidate_outputs: list[dict[str, np.ndarray]], scored: int) -> Figures:
        scores = scorer.results()
        agreement, cosine, sqnr = worst_agreement(scores), worst_cosine(scores), worst_sqnr(scores)
        return Figures(
            agreement=agreement.value if agreement else None,
            accuracy=self._accuracy(candidate_outputs),
            reference_accuracy=self.reference_accuracy,
            min_cosine=cosine.value if cosine else None,
            min_sqnr_db=sqnr.value if sqnr else None,
            agreement_output=agreement.where if agreement else None,
            cosine_output=cosine.where if cosine else None,
            task_outputs=tuple(role.describe() for role in self.roles if role.task),
            non_finite=sum(score.non_finite for score in non_finite_outputs(scores)),
            samples_scored=scored if scored < self.samples else None,
        )

    def _accuracy(self, outputs_per_batch: list[dict[str, np.ndarray]]) -> float | None:
        if self.labels is None or self.label_role is None:
            return None
        name = self.label_role.name
        correct = np.concatenate([correct_samples(self.label_role, batch[name], labels)
                                  for batch, labels in zip(outputs_per_batch, self._label_batches())])
        return float(np.mean(correct))

    def _label_batches(self):
        start = 0
        for feed, _ in self.feeds_and_outputs:
            count = self._count(feed)
            yield self.labels[start:start + count]
            start += count


@dataclass(frozen=True)
class AccuracyTarget:
    """`--max-drop POINTS` (needs labels), `--min-agreement FRACTION` or `--min-cosine C` against fp32."""

    max_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None  # the worst task output's cosine (a detector head: its worst slice)

    @property
    def given(self) -> bool:
        return any(value is not None for value in (self.max_drop, self.min_agreement, self.min_cosine))

    def check(self, probe: AccuracyProbe) -> None:
        if self.max_drop is not None:
            self._check_labels(probe)
        if self.min_agreement is not None and not any(role.agreement for role in probe.roles if role.task):
            scored = ", ".join(role.describe() for role in probe.roles if role.task)
            raise DataError(f"--min-agreement needs class scores or integer labels among the outputs that "
                            f"carry the task; scored: {scored}",
                            hint="name the class-score output with --task-output, or use --max-drop with labels")

        if self.min_cosine is not None and all(role.role == LABELS for role in probe.roles if role.task):
            raise DataError("--min-cosine needs a float output among the outputs that carry the task "
                            "(integer labels have no cosine)", hint="name the output with --task-output")

    @staticmethod
    def _check_labels(probe: AccuracyProbe) -> None:
        """--max-drop compares top-1 accuracy: it needs labels, and an output they are the classes of."""
        if probe.labels is None:
            raise DataError("--max-drop needs labels in the evaluation data",
                            hint="add a 'labels' array to --eval-data, or use --min-agreement")
        if probe.label_role is None:
            scored = ", ".join(role.describe() for role in probe.roles if role.task)
            raise DataError(f"--max-drop: labels of shape {list(probe.labels.shape)} match no output that "
                            f"carries the task ({scored})",
                            hint="labels hold one class per sample (or per position); name the class-score "
                                 "output with --task-output")

    def met(self, figures: Figures) -> bool:
        if figures.non_finite:
            return False
        if self.min_cosine is not None and (figures.min_cosine is None or not figures.min_cosine >= self.min_cosine):
            return False
        if self.max_drop is not None and (figures.drop_points is None or figures.drop_points > self.max_drop):
            return False
        return not (self.min_agreement is not None
                    and (figures.agreement is None or figures.agreement < self.min_agreement))

    def out_of_reach(self, figures: Figures, scored: int, total: int) -> bool:
        """True when no outcome of the `total - scored` samples not yet scored can meet the target: they are
        assumed all agreeing / all correct. Fractions, so an output counted per step (time-major) bounds alike."""
        if figures.non_finite:
            return True
        remaining = (total - scored) / total
        if self.min_agreement is not None and figures.agreement is not None \
                and figures.agreement * scored / total + remaining < self.min_agreement:
            return True
        if self.max_drop is None or figures.accuracy is None or figures.reference_accuracy is None:
            return False
        best_accuracy = figures.accuracy * scored / total + remaining
        return 100.0 * (figures.reference_accuracy - best_accuracy) > self.max_drop

    def describe(self, figures: Figures) -> str:
        parts = []
        if self.max_drop is not None:
            drop = "n/a" if figures.drop_points is None else f"{figures.drop_points:.2f}"
            parts.append(f"top-1 drop {drop} points (target <= {self.max_drop})")
        if self.min_agreement is not None:
            agreement = "n/a" if figures.agreement is None else f"{figures.agreement:.4f}"
            where = f" on {figures.agreement_output}" if figures.agreement_output else ""
            parts.append(f"agreement {agreement}{where} (target >= {self.min_agreement})")
        if self.min_cosine is not None:
            cosine = "n/a" if figures.min_cosine is None else f"{figures.min_cosine:.4f}"
            where = f" on {figures.cosine_output}" if figures.cosine_output else ""
            parts.append(f"cosine {cosine}{where} (target >= {self.min_cosine})")
        if figures.non_finite:
            parts.append(f"{figures.non_finite} non-finite output values")
        return ", ".join(parts)


@dataclass(frozen=True)
class NodeSensitivity:
    node: str
    op_type: str
    figures: Figures

    def badness(self) -> tuple:
        """Sort key, worst first: lower agreement, then lower cosine."""
        agreement = self.figures.agreement if self.figures.agreement is not None else 1.0
        cosine = self.figures.min_cosine if self.figures.min_cosine is not None else 1.0
        return (agreement, -math.inf if math.isnan(cosine) else cosine)


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
    returned_to_float: list[str] = field(default_factory=list)
    node_errors: list[NodeError] = field(default_factory=list)  # own error per node, worst first (bisect)
    search: list[SearchStep] = field(default_factory=list)      # every candidate the search measured

    def enforce(self, quantizer, current, steps: list[str]):
        self.target.check(self.probe)
        figures = self.probe.measure(current.model)
        steps.append(f"accuracy before fallback: {self.target.describe(figures)}")
        self.returned_to_float = []
        # A node's own error is read from twin outputs of the main graph; inside If/Loop/Scan bodies it cannot
        # be, so there every node is measured by quantizing it alone.
        in_bodies = set(current.plan.compute) - set(current.plan.main_part().compute)
        if not self.target.met(figures):
            if quantizer.config.recovery == "one-by-one" or in_bodies:
                if in_bodies and quantizer.config.recovery != "one-by-one":
                    steps.append(f"{len(in_bodies)} int8 nodes inside If/Loop/Scan bodies: nodes measured one by one")
                current, figures = self._one_by_one(quantizer, current, figures)
            else:
                current, figures = self._bisect(quantizer, current)
        self.final_figures = figures
        steps.append(f"accuracy after fallback ({len(self.returned_to_float)} nodes back to float): "
                     f"{self.target.describe(figures)}")
        if not self.target.met(figures):
            raise TargetNotMet(f"accuracy target missed even with every quantizable node in float: "
                               f"{self.target.describe(figures)}",
                               hint="check the evaluation data, or loosen --max-drop / --min-agreement")
        if quantizer.config.speed_check and current.plan.compute:
            current.speedup = quantizer.speedup(current.model)
            if not meets(current.speedup):
                raise TargetNotMet(f"the accuracy target is met only by a model slower than fp32 "
                                   f"({current.speedup:.2f}x with {len(self.returned_to_float)} nodes back in float)",
                                   hint="quantization does not pay off for this model at this accuracy target")
        return current

    def report(self) -> dict:
        """For --json: how the search went, and every node's own error when it was measured."""
        return {"search": "one-by-one" if not self.node_errors else "bisect",
                "candidates_measured": len(self.search) if self.node_errors else None,
                "steps": [step.to_dict() for step in self.search],
                "returned_to_float": list(self.returned_to_float),
                "node_errors": [error.to_dict() for error in self.node_errors]}

    def _one_by_one(self, quantizer, current, figures: Figures):
        """Each node quantized alone and measured (one model per node), then returned to float worst first."""
        ranking = node_sensitivity(quantizer, self.probe, current.keep_float, self.progress)
        for entry in ranking:
            reason = f"returned to float to meet the accuracy target (sensitivity rank " \
                     f"{len(self.returned_to_float) + 1})"
            current = quantizer.fused_attempt({**current.keep_float, entry.node: reason})
            self.returned_to_float.append(entry.node)
            figures = self.probe.measure(current.model)
            if self.target.met(figures) or not current.plan.compute:
                break
        return current, figures

    def _bisect(self, quantizer, current):
        """Own error of every node from one pass, then the fewest nodes in float that meet the target, searched
        by groups (recovery.fewest_in_float) within search_budget(n) candidate evaluations."""
        samples = min(quantizer.config.samples or RECOVERY_SAMPLES, RECOVERY_SAMPLES)
        errors = node_errors(quantizer.prepared, current.plan, quantizer.ranges, quantizer.dataset,
                             signed=quantizer.signed, per_channel=quantizer.config.per_channel,
                             batch_size=quantizer.config.batch_size, samples=samples,
                             provider=quantizer.config.provider)
        self.node_errors = errors
        order = [error.node for error in errors]
        rank = {error.node: (position, error) for position, error in enumerate(errors, 1)}
        measured: dict[frozenset[str], tuple] = {}  # by set: rounds list needed nodes first
        budget = search_budget(len(order))

        def keep_float(nodes: tuple[str, ...]) -> dict[str, str]:
            return {**current.keep_float, **{node: f"returned to float to meet the accuracy target (own error rank "
                                                   f"{rank[node][0]}, {rank[node][1].sqnr_db:.1f} dB)"
                                             for node in nodes}}

        def enough(nodes: tuple[str, ...]) -> bool:
            # Plain attempts while searching (no onnxruntime fusion query per candidate): nodes onnxruntime
            # would not fuse compute the same values either way; the one kept is fused below.
            attempt = quantizer.attempt(keep_float(nodes))
            figures = self.probe.measure(attempt.model)  # a failing one stops early (stopping_early)
            met = self.target.met(figures)
            measured[frozenset(nodes)] = (attempt, figures)
            self.search.append(SearchStep(len(nodes), met, figures.to_dict()))
            if self.progress:
                self.progress("searching nodes to return to float", len(self.search), budget)
            return met

        with self.probe.stopping_early(self.target):
            chosen = fewest_in_float(enough, order, budget)
        if frozenset(chosen) not in measured:  # every node in float: known to meet, measured for the figures
            enough(chosen)
        self.returned_to_float = list(chosen)
        attempt, figures = measured[frozenset(chosen)]
        fused = quantizer.fused_attempt(attempt.keep_float)
        if fused.plan.compute == attempt.plan.compute:
            return fused, figures
        return fused, self.probe.measure(fused.model)


@contextmanager
def _session(model: onnx.ModelProto, provider: str):
    """A session for `model`; one holding mapped weights (io.load_model(read_weights=False), a weight-only
    rewrite of it) is opened from files beside its weights, not read into memory."""
    if not holds_mapped_weights(model):
        yield create_session(model, provider)
        return
    with on_disk(model) as (path,):
        yield create_session(path, provider)


def search_budget(nodes: int) -> int:
    """Candidate evaluations the group search may spend on `nodes` candidates: O(log n), about three
    bisections' worth (one to find the first needed node, the rest to drop nodes the ranking misplaced)."""
    return max(SEARCH_BUDGET_FLOOR, 3 * math.ceil(math.log2(nodes + 1)))


def _cut_into_batches(feeds: Iterable[dict], outputs: Mapping[str, np.ndarray]) -> list[tuple[dict, dict]]:
    """Each feed with its rows of `outputs` (the samples in the same order, batch layout)."""
    pairs, start = [], 0
    for feed in feeds:
        rows = int(next(iter(feed.values())).shape[0])
        pairs.append((feed, {name: values[start:start + rows] for name, values in outputs.items()}))
        start += rows
    return pairs

"""Mixed precision for 4-bit weight-only quantization: which layers get 8-bit codes so that an accuracy target
is met, measured on the model's outputs.

4-bit codes cost every layer about the same share of its own output (a relative error of 0.06-0.075 on each of
the half-gb decoder's 71 MatMuls), but not the same share of the model's output: measured there, the logits
cosine rose from 0.9674 to 0.9704 with lm_head at 8 bits, 0.9754 with every gate and up projection, 0.9863 with
every v, o and down projection. A layer's own error does not say where it lands, so the search measures it:

1. Layers that play one part in each repeated block (names equal but for their numbers: `layers.3/v_proj`) form
   a group; each group is measured once with its layers at 8 bits (one candidate per group, not per layer).
2. Layers are ordered by what their group gained per weight widened, then by their own output error.
3. The fewest layers of that order that meet the target are searched by groups of layers (recovery.fewest_in_float,
   O(log n) candidates), every candidate measured against fp32.

The 8-bit layers run on the same MatMulNBits int8-compute kernel (2.93x fp32 on a decode step where 4 bits run
3.88x), so the speed stays; each candidate is assembled from one 4-bit and one 8-bit rewrite by moving nodes
(graph.edit.transplant_nodes), nothing quantized twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from compressq.errors import TargetNotMet
from compressq.graph.edit import transplant_nodes
from compressq.progress import Stage
from compressq.quantize.accuracy import AccuracyProbe, AccuracyTarget, Figures, search_budget
from compressq.quantize.recovery import SearchStep, fewest_in_float

MAX_GROUPS = 24  # more distinct parts than this: no repeated structure to measure by, layers ordered by error


@dataclass(frozen=True)
class Layer:
    """A quantized MatMul as the search sees it."""

    node: str
    output: str          # the tensor it produces: how a node is found in either rewrite
    weights: int         # K * N, what widening it costs
    output_error: float  # its own output's squared error at 4 bits on calibration rows (0 when not measured)


@dataclass
class PrecisionReport:
    target: str
    before: dict
    after: dict | None = None
    wide_layers: list[str] = field(default_factory=list)
    groups: dict[str, dict] = field(default_factory=dict)  # group -> {"layers", "figure"} when measured
    steps: list[SearchStep] = field(default_factory=list)
    candidates_measured: int = 1

    def to_dict(self) -> dict:
        return {"target": self.target, "before": self.before, "after": self.after,
                "wide_layers": list(self.wide_layers), "groups": self.groups,
                "candidates_measured": self.candidates_measured, "steps": [step.to_dict() for step in self.steps]}


def group_of(node: str) -> str:
    """The part a node plays in a repeated block: its name with every number replaced."""
    return re.sub(r"\d+", "#", node)


def distance(figures: Figures) -> float:
    """How far a candidate is from fp32, for ordering: 1 - cosine of the worst task output, else 1 - agreement."""
    if figures.min_cosine is not None:
        return 1.0 - figures.min_cosine
    return 1.0 - (figures.agreement or 0.0)


def widening_order(layers: Sequence[Layer], group_distance: Mapping[str, float], base: float) -> list[str]:
    """Layers by what their group gained per weight widened (measured), then by their own output error."""
    weights: dict[str, int] = {}
    for layer in layers:
        weights[group_of(layer.node)] = weights.get(group_of(layer.node), 0) + layer.weights

    def gain(layer: Layer) -> float:
        group = group_of(layer.node)
        return (base - group_distance.get(group, base)) / max(weights[group], 1)

    return [layer.node for layer in sorted(layers, key=lambda layer: (-gain(layer), -layer.output_error, layer.node))]


def widen_until_met(narrow: onnx.ModelProto, wide: onnx.ModelProto, layers: Sequence[Layer], probe: AccuracyProbe,
                    target: AccuracyTarget, progress: Callable[[str, int, int], None] | None = None
                    ) -> tuple[onnx.ModelProto, PrecisionReport]:
    """`narrow` (every layer at 4 bits) with the fewest `layers` taken from `wide` (8 bits) that meet `target`."""
    before = probe.measure(narrow)
    report = PrecisionReport(target.describe(before), before.to_dict())
    if target.met(before):
        report.after = report.before
        return narrow, report
    outputs = {layer.node: layer.output for layer in layers}
    measured: dict[frozenset[str], Figures] = {}  # figures only: a candidate is rebuilt in a moment, and kept
    # models would each hold a copy of the in-memory weights

    def mixed(nodes: Sequence[str]) -> onnx.ModelProto:
        return transplant_nodes(narrow, wide, [outputs[node] for node in nodes])

    def candidate(nodes: Sequence[str]) -> Figures:
        key = frozenset(nodes)
        if key not in measured:
            measured[key] = probe.measure(mixed(nodes))
        return measured[key]

    everything = [layer.node for layer in layers]
    widest = candidate(everything)
    if not target.met(widest):
        raise TargetNotMet(f"accuracy target missed even with every layer at 8 bits: {target.describe(widest)}",
                           hint="use --bits 8, or loosen the target")
    group_distance = _measure_groups(layers, candidate, progress, report)
    order = widening_order(layers, group_distance, distance(before))
    budget = search_budget(len(order))
    stage = Stage(progress, "searching layers for 8 bits", budget)

    def meets(nodes: tuple[str, ...]) -> bool:
        figures = candidate(nodes)
        met = target.met(figures)
        report.steps.append(SearchStep(len(nodes), met, figures.to_dict()))
        stage.advance()
        return met

    chosen = fewest_in_float(meets, order, budget)
    model, figures = mixed(chosen), candidate(chosen)
    report.wide_layers, report.after = sorted(chosen), figures.to_dict()
    report.candidates_measured = 1 + len(measured)
    report.target = target.describe(figures)
    return model, report


def _measure_groups(layers: Sequence[Layer], candidate, progress, report: PrecisionReport) -> dict[str, float]:
    """Each group of layers that play one part in a repeated block, measured once at 8 bits."""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(group_of(layer.node), []).append(layer.node)
    if len(groups) > MAX_GROUPS or len(groups) == len(layers):
        return {}  # nothing repeats: the layers' own errors order them
    stage = Stage(progress, "measuring layer groups at 8 bits", len(groups))
    found = {}
    for group, nodes in sorted(groups.items()):
        found[group] = distance(candidate(nodes))
        report.groups[group] = {"layers": len(nodes), "distance_to_fp32": found[group]}
        stage.advance()
    return found

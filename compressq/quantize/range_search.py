"""Ranges chosen by the error they cause (`--method auto`): per tensor, the clipping range among min-max,
percentiles and the MSE search whose quantization changes the *consuming* layers' outputs least.

One pass over calibration data: a copy of the float graph gets, for every tensor and every distinct
candidate range, QuantizeLinear -> DequantizeLinear of the fp32 tensor feeding a copy of each quantized
consumer (fp32 weights, fp32 other inputs), so the error measured is that of this one range alone. The
squared error and the signal are reduced inside the graph (ReduceSumSquare): only scalars come back.
A tensor no quantized node reads (a graph output, a pass-through) is judged by its own squared error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from compressq.data import Dataset
from compressq.graph.edit import NameGenerator, toposort
from compressq.graph.index import GraphIndex
from compressq.quantize.plan import QuantPlan
from compressq.quantize.recovery import GraphWriter
from compressq.stats.collect import TensorRange, sum_outputs

PREFERRED = "minmax"  # kept on ties: the range that clips nothing


@dataclass(frozen=True)
class RangeChoice:
    tensor: str
    method: str                         # the chosen candidate: minmax | p99.999 | p99.99 | mse
    range: TensorRange
    errors: dict[str, float] = field(default_factory=dict)  # candidate -> consumers' noise / signal
    judged_on: tuple[str, ...] = ()     # the consuming nodes compared (empty: the tensor itself)

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "method": self.method, "range": [self.range.low, self.range.high],
                "consumer_error": {k: float(f"{v:.4g}") for k, v in self.errors.items()},
                "judged_on": list(self.judged_on)}


def _consumers(plan: QuantPlan, index: GraphIndex, tensor: str) -> list[onnx.NodeProto]:
    found = []
    for node in index.consumers.get(tensor, []):
        compute = plan.compute.get(node.name)
        if (compute is not None and compute.activation == tensor) or node.name in plan.own_scale_nodes:
            found.append(node)
    return found


def choose_ranges(model: onnx.ModelProto, plan: QuantPlan, candidates: dict[str, dict[str, TensorRange]],
                  dataset: Dataset, *, signed: bool = False, batch_size: int = 8, samples: int | None = None,
                  progress: Callable[[int], None] | None = None, provider: str = "cpu"
                  ) -> tuple[dict[str, TensorRange], dict[str, RangeChoice]]:
    """Every tensor's range (the chosen candidate) and, for tensors with a real choice, what was measured."""
    ranges = {t: options.get(PREFERRED, next(iter(options.values()))) for t, options in candidates.items()}
    # Every quantized tensor, not only today's scale-group roots: a plan with more nodes in float splits
    # groups, and the tensors that become roots then need their own chosen range too.
    roots = sorted(t for t in plan.quantized_tensors if t in candidates
                   and len({(r.low, r.high) for r in candidates[t].values() if r.finite}) > 1)
    if not roots:
        return ranges, {}
    combined = onnx.ModelProto()
    combined.CopyFrom(model)
    index = GraphIndex(combined.graph)
    writer = GraphWriter(combined.graph, NameGenerator(combined.graph), signed)
    # (tensor, candidate) -> [(noise output, signal key)]; signal key -> signal output
    noise_outputs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    signal_outputs: dict[str, str] = {}
    judged: dict[str, tuple[str, ...]] = {}
    for tensor in roots:
        consumers = _consumers(plan, index, tensor)
        judged[tensor] = tuple(n.name for n in consumers)
        seen: set[tuple[float, float]] = set()
        for label, candidate in candidates[tensor].items():
            if (candidate.low, candidate.high) in seen or not candidate.finite:
                continue
            seen.add((candidate.low, candidate.high))
            dequantized = writer.qdq(tensor, candidate, tag=label)
            pairs = [(n.output[0], writer.copy(n, [dequantized if i == tensor else i for i in n.input]))
                     for n in consumers] or [(tensor, dequantized)]
            noise_outputs[(tensor, label)] = []
            for reference, quantized in pairs:
                if reference not in signal_outputs:
                    signal_outputs[reference] = writer.sum_of_squares(reference)
                noise_outputs[(tensor, label)].append((writer.sum_of_squares(quantized, minus=reference),
                                                       reference))
    writer.flush()
    toposort(combined.graph)
    names = sorted({n for pairs in noise_outputs.values() for n, _ in pairs} | set(signal_outputs.values()))
    totals = sum_outputs(combined, names, dataset, batch_size=batch_size, samples=samples, provider=provider,
                         progress=progress)
    choices: dict[str, RangeChoice] = {}
    for tensor in roots:
        errors = {label: sum(totals[noise] / max(totals[signal_outputs[ref]], 1e-30) for noise, ref in pairs)
                  for (t, label), pairs in noise_outputs.items() if t == tensor}
        best = min(errors, key=lambda label: (errors[label], label != PREFERRED))
        ranges[tensor] = candidates[tensor][best]
        choices[tensor] = RangeChoice(tensor, best, ranges[tensor], errors, judged[tensor])
    return ranges, choices


def summarize(choices: dict[str, RangeChoice]) -> str:
    counts: dict[str, int] = {}
    for choice in choices.values():
        counts[choice.method] = counts.get(choice.method, 0) + 1
    return ", ".join(f"{count} {method}" for method, count in sorted(counts.items(), key=lambda kv: -kv[1]))


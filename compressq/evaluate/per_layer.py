"""Per-layer error: which intermediate tensor of a candidate drifts furthest from the baseline's.

Tensors are matched by name. Quantizers and pruners in compressq (and onnxruntime's) keep the names of
the float tensors they leave in place; the tensors they add (DequantizeLinear outputs, integer
accumulators) get new names and so are never matched by accident.

Where the candidate quantizes a matched tensor (name -> QuantizeLinear -> DequantizeLinear), the
DequantizeLinear output is compared: it is what the candidate's next layer really sees. This matters
beyond rounding: onnxruntime's QDQ quantizer drops a Relu/Clip and gives its output name to the tensor
before it, leaving the clipping to QuantizeLinear's saturation, so the raw tensor is not clipped at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from compressq.graph.index import tensor_types
from compressq.measure.metrics import OutputAgreement

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})


@dataclass
class LayerComparison:
    tensor: str
    op_type: str  # the baseline node that produces the tensor
    candidate_tensor: str  # `tensor`, or the DequantizeLinear output that carries it in the candidate
    cosine: float
    sqnr_db: float
    max_abs_error: float


def produced_tensors(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> op type of the node that produces it (top-level graph only)."""
    return {name: node.op_type for node in model.graph.node for name in node.output if name}


def matched_tensors(baseline: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, str]:
    """Baseline tensor -> candidate tensor to compare it with, for the intermediate float tensors that
    both graphs compute under the same name (in baseline order)."""
    in_candidate = produced_tensors(candidate)
    consumers = _consumers(candidate)
    outputs = {o.name for o in baseline.graph.output}
    types = tensor_types(baseline)
    matched = {}
    for name in produced_tensors(baseline):
        if name in outputs or name not in in_candidate:
            continue
        known = types.get(name)
        if known is not None and known.elem_type and known.elem_type not in FLOAT_TYPES:
            continue  # integer tensors (shapes, indices) are exact or meaningless to compare
        matched[name] = _dequantized_form(name, consumers)
    return matched


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _dequantized_form(name: str, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    for quantize in consumers.get(name, []):
        if quantize.op_type != "QuantizeLinear":
            continue
        for dequantize in consumers.get(quantize.output[0], []):
            if dequantize.op_type == "DequantizeLinear":
                return dequantize.output[0]
    return name


class LayerErrors:
    """Streams batches of intermediate tensors and keeps per-tensor running sums only."""

    def __init__(self, matches: dict[str, str], op_types: dict[str, str]) -> None:
        self.op_types = op_types
        self.matches = matches
        self.reducers = {name: OutputAgreement() for name in matches}
        self.skipped: set[str] = set()  # shapes differ (a pruned layer) or not floats at run time

    def update(self, baseline_values: dict[str, np.ndarray], candidate_values: dict[str, np.ndarray]) -> None:
        for name, reducer in self.reducers.items():
            if name in self.skipped:
                continue
            reference, test = baseline_values.get(name), candidate_values.get(self.matches[name])
            if reference is None or test is None or not _comparable(reference, test):
                self.skipped.add(name)
                continue
            reducer.update(reference, test)

    def results(self) -> list[LayerComparison]:
        """Worst first: lowest SQNR, then lowest cosine."""
        rows = []
        for name, reducer in self.reducers.items():
            if name in self.skipped or reducer.samples == 0:
                continue
            summary = reducer.result()
            rows.append(LayerComparison(name, self.op_types.get(name, "?"), self.matches[name], summary.cosine,
                                        summary.sqnr_db, summary.max_abs_error))
        return sorted(rows, key=lambda row: (row.sqnr_db, row.cosine))


def _comparable(reference: np.ndarray, test: np.ndarray) -> bool:
    reference, test = np.asarray(reference), np.asarray(test)
    return (reference.shape == test.shape and np.issubdtype(reference.dtype, np.floating)
            and np.issubdtype(test.dtype, np.floating))

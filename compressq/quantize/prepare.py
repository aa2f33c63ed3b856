"""Graph clean-up before quantization: what onnxruntime's own basic optimizer would do at load time.

BatchNormalization must be folded into its Conv *before* QuantizeLinear/DequantizeLinear pairs are
inserted, or the pairs would sit between Conv and BatchNorm and block both fusions. onnxruntime's basic
level (constant folding, Conv+BatchNorm/Add/Mul fusion, redundant node removal) is provider independent
and leaves standard ONNX ops, so it is the same graph onnxruntime would run anyway.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from compressq.graph.edit import NameGenerator, name_nodes, share_duplicate_initializers
from compressq.graph.index import GraphIndex
from compressq.io import EXTERNAL_DATA_THRESHOLD, model_bytes
from compressq.runtime import optimized_graph


def prepare_for_quantization(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A cleaned copy of `model` with every node named, plus notes about what could not be done."""
    notes: list[str] = []
    if model_bytes(model) > EXTERNAL_DATA_THRESHOLD:  # ByteSize() raises EncodeError past 2 GB
        prepared = onnx.ModelProto()
        prepared.CopyFrom(model)
        notes.append("model over 2 GB: onnxruntime's pre-quantization clean-up skipped")
    else:
        prepared = optimized_graph(model, "cpu", basic=True)
        share_duplicate_initializers(prepared.graph)  # constant folding copies weights into every branch
    # onnxruntime drops metadata and may bump nothing else; keep what the user's model recorded.
    del prepared.metadata_props[:]
    prepared.metadata_props.extend(model.metadata_props)
    _divisions_as_multiplications(prepared.graph)
    name_nodes(prepared.graph)
    return prepared, notes


def _divisions_as_multiplications(graph: onnx.GraphProto) -> None:
    """x / c -> x * (1/c) for float constants c, so that the division can run as onnxruntime's QLinearMul
    (HardSwish exports divide by 6). The result differs from the division by at most one float rounding."""
    index = GraphIndex(graph)
    names = NameGenerator(graph)
    for node in graph.node:
        if node.op_type != "Div" or len(node.input) != 2:
            continue
        divisor = index.constant(node.input[1])
        if divisor is None or divisor.dtype != np.float32 or not np.all(np.isfinite(divisor)) or np.any(divisor == 0):
            continue
        reciprocal = names(f"{node.input[1]}_reciprocal")
        graph.initializer.append(numpy_helper.from_array((1.0 / divisor).astype(np.float32), reciprocal))
        node.op_type = "Mul"
        node.input[1] = reciprocal



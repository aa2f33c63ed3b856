"""Graph clean-up before quantization: what onnxruntime's own basic optimizer would do at load time.

BatchNormalization must be folded into its Conv *before* QuantizeLinear/DequantizeLinear pairs are
inserted, or the pairs would sit between Conv and BatchNorm and block both fusions. onnxruntime's basic
level (constant folding, Conv+BatchNorm/Add/Mul fusion, redundant node removal) is provider independent
and leaves standard ONNX ops, so it is the same graph onnxruntime would run anyway.
"""

from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort

from compressq.graph import EXTERNAL_DATA_THRESHOLD
from compressq.quantize.plan import name_nodes
from compressq.runtime import create_session


def prepare_for_quantization(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A cleaned copy of `model` with every node named, plus notes about what could not be done."""
    notes: list[str] = []
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        prepared = onnx.ModelProto()
        prepared.CopyFrom(model)
        notes.append("model over 2 GB: onnxruntime's pre-quantization clean-up skipped")
    else:
        prepared = _basic_optimized(model)
    # onnxruntime drops metadata and may bump nothing else; keep what the user's model recorded.
    del prepared.metadata_props[:]
    prepared.metadata_props.extend(model.metadata_props)
    name_nodes(prepared.graph)
    return prepared, notes


def _basic_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="compressq-prepare-") as folder:
        path = os.path.join(folder, "prepared.onnx")
        create_session(model, "cpu", threads=1, optimized_path=path,
                       level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        return onnx.load(path)

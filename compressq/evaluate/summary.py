"""What `compressq inspect` knows about a model, as plain data (rendered by compressq.render)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compressq.graph.index import GraphIndex, all_nodes, opset_version, scopes, value_type
from compressq.io import file_size, read_stamp, tensor_chunks
from compressq.ops import QUANTIZED_OPS

LOW_BIT_TYPES = {
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: list


@dataclass(frozen=True)
class InitializerInfo:
    name: str
    dtype: str
    shape: list[int]
    parameters: int
    bytes: int
    zero_fraction: float


@dataclass(frozen=True)
class DtypeTotals:
    parameters: int
    bytes: int


@dataclass(frozen=True)
class QuantizationState:
    quantize_linear: int
    dequantize_linear: int
    low_bit_initializers: dict[str, int]
    quantized_ops: dict[str, int]

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantize_linear or self.dequantize_linear or self.quantized_ops
                    or self.low_bit_initializers)


@dataclass(frozen=True)
class GraphTotals:
    """Nodes and weights of one graph: the main graph, or an If/Loop/Scan body (its own bodies not counted)."""

    graph: str
    nodes: int
    parameters: int
    bytes: int


@dataclass
class ModelSummary:
    path: str
    file_bytes: int
    ir_version: int
    opset: int
    opsets: dict[str, int]
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    node_count: int
    op_histogram: dict[str, int]
    parameters: int
    parameter_bytes: int
    by_dtype: dict[str, DtypeTotals]
    zero_fraction: float
    initializers: list[InitializerInfo]
    quantization: QuantizationState
    compressq: dict[str, str] = field(default_factory=dict)
    graphs: list[GraphTotals] = field(default_factory=list)  # more than one when the model has bodies

    def to_dict(self) -> dict:
        data = asdict(self)
        data["quantization"]["is_quantized"] = self.quantization.is_quantized
        return data


def summarize(model: onnx.ModelProto, path: str | os.PathLike) -> ModelSummary:
    """What `compressq inspect` shows: inputs, outputs, op counts, parameters (Constant-held ones too),
    sparsity, what is already quantized, and the file's size on disk (`path`, external data included).

    `model` may come from `load_model(path, read_weights=False)`: external weights are then read from `path`'s
    folder a chunk at a time (memory stays far below the model's size)."""
    index = GraphIndex(model.graph)
    nodes = list(all_nodes(model.graph))
    stored = [(scope.label, scope.graph, stored_tensors(scope.graph)) for scope in scopes(model.graph)]
    per_graph = [(label, graph, [_initializer_info(t, path) for t in tensors]) for label, graph, tensors in stored]
    initializers = [info for _, _, infos in per_graph for info in infos]
    parameters = sum(i.parameters for i in initializers)
    zeros = sum(round(i.zero_fraction * i.parameters) for i in initializers)
    return ModelSummary(
        path=str(path),
        file_bytes=file_size(Path(path), loaded=model),
        ir_version=model.ir_version,
        opset=opset_version(model),
        opsets={entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=[_tensor_info(v) for v in model.graph.input if v.name in index.graph_inputs],
        outputs=[_tensor_info(v) for v in model.graph.output],
        node_count=len(nodes),
        op_histogram=dict(Counter(n.op_type for n in nodes).most_common()),
        parameters=parameters,
        parameter_bytes=sum(i.bytes for i in initializers),
        by_dtype=_totals_by_dtype(initializers),
        zero_fraction=zeros / parameters if parameters else 0.0,
        initializers=initializers,
        quantization=_quantization_state(nodes, [t for _, _, tensors in stored for t in tensors]),
        compressq=read_stamp(model),
        graphs=[GraphTotals(label, len(graph.node), sum(i.parameters for i in infos), sum(i.bytes for i in infos))
                for label, graph, infos in per_graph] if len(per_graph) > 1 else [],
    )


def stored_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers plus weight-like Constant values: some exporters (paddle2onnx) keep every weight there.

    Weight-like = floating point with more than one element; scalar bounds and shape constants are not
    parameters.
    """
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE}
    tensors = list(graph.initializer)
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.t.data_type in float_types and \
                    int(np.prod(attribute.t.dims)) > 1:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attribute.t)
                tensor.name = node.output[0]
                tensors.append(tensor)
    return tensors


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    kind = value_type(value)
    dtype = onnx.helper.tensor_dtype_to_string(kind.elem_type).replace("TensorProto.", "").lower() \
        if kind.elem_type else "unknown"
    shape = ["?" if d is None else d for d in kind.shape] if kind.shape is not None else []
    return TensorInfo(value.name, dtype, shape)


def dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "").lower()


def _initializer_info(tensor: onnx.TensorProto, path: str | os.PathLike) -> InitializerInfo:
    count, zeros, itemsize = 0, 0, 1
    for values in tensor_chunks(tensor, path):  # one chunk at a time: external weights are never read whole
        count += int(values.size)
        itemsize = values.dtype.itemsize
        zeros += int(np.count_nonzero(values == 0)) if values.size and values.dtype != object else 0
    bits = 4 if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else None
    nbytes = (count + 1) // 2 if bits == 4 else count * itemsize
    return InitializerInfo(
        name=tensor.name, dtype=dtype_name(tensor.data_type), shape=list(tensor.dims),
        parameters=count, bytes=int(nbytes), zero_fraction=zeros / count if count else 0.0,
    )


def _totals_by_dtype(initializers: list[InitializerInfo]) -> dict[str, DtypeTotals]:
    totals: dict[str, list[int]] = {}
    for info in initializers:
        entry = totals.setdefault(info.dtype, [0, 0])
        entry[0] += info.parameters
        entry[1] += info.bytes
    return {dtype: DtypeTotals(p, b) for dtype, (p, b) in sorted(totals.items(), key=lambda kv: -kv[1][1])}


def _quantization_state(nodes: list[onnx.NodeProto], initializers) -> QuantizationState:
    ops = Counter(n.op_type for n in nodes)
    low_bit = Counter(LOW_BIT_TYPES[t.data_type] for t in initializers if t.data_type in LOW_BIT_TYPES)
    return QuantizationState(
        quantize_linear=ops.get("QuantizeLinear", 0),
        dequantize_linear=ops.get("DequantizeLinear", 0),
        low_bit_initializers=dict(low_bit),
        quantized_ops={op: n for op, n in sorted(ops.items()) if op in QUANTIZED_OPS},
    )

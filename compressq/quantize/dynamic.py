"""Dynamic quantization: int8 weights, activations quantized at run time (no calibration data needed).

MatMul and Gemm with constant weights become onnxruntime's DynamicQuantizeMatMul, which quantizes its
input per call and runs an integer GEMM. Convolutions stay float: onnxruntime's dynamic ConvInteger path
is slower than its float convolutions on CPU.

Weights are read one at a time (`io.tensor_array`): a model loaded with its weights mapped
(`load_model(read_weights=False)`) has each int8 weight written to a spill file as soon as it is made
(`io.TensorSink`), so memory holds one float weight and its int8 copy, never the model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from compressq.graph.edit import NameGenerator, remove_unused, share_duplicate_initializers, toposort
from compressq.graph.index import GraphIndex, check_exclude, node_attributes, scopes
from compressq.graph.passes import PassResult, Skip
from compressq.io import TensorSink, read_mapped_body_weights, tensor_array
from compressq.progress import Progress, Stage
from compressq.quantize import scheme
from compressq.quantize.plan import matches

MICROSOFT_DOMAIN = "com.microsoft"


def quantize_dynamic(model: onnx.ModelProto, exclude: tuple[str, ...] = (), per_channel: bool = True,
                     progress: Progress | None = None) -> PassResult:
    """A pass (graph/passes.py): MatMul/Gemm with constant weights -> int8 weights, activations quantized at run
    time; `modified` lists the nodes quantized; `progress(stage, done, total)` counts MatMul/Gemm nodes."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    check_exclude(result.graph, exclude)
    names = NameGenerator(result.graph)
    outcome = PassResult(result)
    sink = TensorSink(model)
    found = scopes(result.graph)
    stage = Stage(progress, "quantizing weights to int8", sum(
        node.op_type in ("MatMul", "Gemm") for scope in found for node in scope.graph.node))
    # Innermost bodies first (If/Loop/Scan): a body's int8 copy of an outer weight leaves the float one unused,
    # and the outer graph then drops it. Nodes are replaced where they stand: no reordering is needed.
    for scope in reversed(found):
        _quantize_graph(scope.graph, scope.index(), names, sink, exclude, per_channel, outcome, stage)
    if outcome.modified and not any(o.domain == MICROSOFT_DOMAIN for o in result.opset_import):
        result.opset_import.append(helper.make_opsetid(MICROSOFT_DOMAIN, 1))
    for scope in reversed(scopes(result.graph)):  # float weights a body no longer reads go too
        remove_unused(scope.graph)
    read_mapped_body_weights(result.graph)  # compared by value below
    share_duplicate_initializers(result.graph)  # two branches reading one outer weight: one int8 copy
    toposort(result.graph)
    return outcome


def _quantize_graph(graph: onnx.GraphProto, index: GraphIndex, names: NameGenerator, sink: TensorSink, exclude,
                    per_channel: bool, outcome: PassResult, stage: Stage) -> None:
    replacements: dict[int, onnx.NodeProto] = {}
    for position, node in enumerate(graph.node):
        if node.op_type in ("Conv", "ConvTranspose"):
            outcome.skipped.append(Skip(node.name, node.op_type, "dynamic mode keeps convolutions float "
                                           "(pass --calibration-data for static int8)"))
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        weight, reason = _weight_matrix(node, index, exclude)
        if weight is None:
            outcome.skipped.append(Skip(node.name, node.op_type, reason or "no constant weight"))
        else:
            replacements[position] = _dynamic_matmul(node, weight, _bias(node, index), names, sink, graph,
                                                     per_channel)
            outcome.modified.append(node.name)
            del weight  # a mapped weight's pages go back now, not when the loop ends
        stage.advance()
    for position, replacement in replacements.items():
        graph.node[position].CopyFrom(replacement)


def _weight_matrix(node: onnx.NodeProto, index: GraphIndex, exclude) -> tuple[np.ndarray | None, str | None]:
    """The weight as [K, N], or a reason why this node stays float."""
    if matches(node, exclude):
        return None, "excluded by --exclude"
    weight = constant_value(index, node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.dtype != np.float32 or weight.ndim != 2:
        return None, "weight is not a constant 2-D float32 tensor"
    if node.op_type == "Gemm":
        attributes = node_attributes(node)
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return None, "Gemm with transA/alpha/beta has no dynamic integer kernel"
        if attributes.get("transB", 0):
            weight = weight.T
    return np.ascontiguousarray(weight), None


def _bias(node: onnx.NodeProto, index: GraphIndex) -> np.ndarray | None:
    if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return None
    bias = constant_value(index, node.input[2])
    return bias if bias is not None and bias.ndim == 1 else None


def constant_value(index: GraphIndex, name: str) -> np.ndarray | None:
    """`index.constant`, with initializers read through io (memory-mapped when the model's weights are)."""
    tensor = index.initializers.get(name)
    return tensor_array(tensor) if tensor is not None else index.constant(name)


ROW_CHUNK_BYTES = 16 * 2**20  # float rows quantized at a time: the temporaries stay small for a 0.5 GB lm_head


def _column_bounds(weight: np.ndarray) -> np.ndarray:
    """max |w| of every column [1, N], a block of rows at a time: weight_params of it equals weight_params of the
    weight (per column, or per tensor), without an |w| temporary as big as the weight."""
    bounds = np.zeros((1, weight.shape[1]), np.float32)
    rows = _rows_per_chunk(weight)
    for start in range(0, weight.shape[0], rows):
        np.maximum(bounds, np.abs(weight[start:start + rows]).max(axis=0, initial=0), out=bounds)
    return bounds


def _rows_per_chunk(weight: np.ndarray) -> int:
    return max(1, ROW_CHUNK_BYTES // max(1, weight.shape[1] * 4))


def _quantized_by_rows(weight: np.ndarray, params: scheme.QuantParams) -> np.ndarray:
    """`scheme.quantize(weight, params)`, a block of rows at a time (per-column or per-tensor scales: the same
    codes), so the float temporaries of rounding never hold a whole big weight."""
    codes = np.empty(weight.shape, params.dtype)
    rows = _rows_per_chunk(weight)
    for start in range(0, weight.shape[0], rows):
        codes[start:start + rows] = scheme.quantize(weight[start:start + rows], params)
    return codes


def _dynamic_matmul(node, weight: np.ndarray, bias, names: NameGenerator, sink: TensorSink, graph,
                    per_channel: bool):
    params = scheme.weight_params(_column_bounds(weight), 1 if per_channel else None)
    prefix = node.input[1]
    tensors = {
        names(f"{prefix}_quantized"): _quantized_by_rows(weight, params),
        names(f"{prefix}_scale"): params.scale.astype(np.float32),
        names(f"{prefix}_zero_point"): params.zero_point,
    }
    if bias is not None:
        tensors[names(f"{prefix}_bias")] = bias.astype(np.float32)
    for name, value in tensors.items():
        graph.initializer.append(sink.tensor(value, name))
    inputs = [node.input[0], *tensors]
    return helper.make_node("DynamicQuantizeMatMul", inputs, list(node.output), name=node.name,
                            domain=MICROSOFT_DOMAIN)

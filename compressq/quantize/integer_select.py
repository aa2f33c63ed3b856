"""Max and Min on the int8 tensors themselves, where onnxruntime would leave them float.

onnxruntime drops the DequantizeLinear/QuantizeLinear pairs around data-movement ops (MaxPool,
Transpose, ...) but has no such rule for element-wise Max/Min, although its CPU provider has uint8 and
int8 Max/Min kernels. With one scale and zero point on every input and the output (the plan groups them,
see plan.SELECT_OPS), quantization is monotonic, so

    Q(max(DQ(a), DQ(b))) == max(a, b)

exactly, and the float Max with its three conversions can be replaced by a Max on the quantized tensors.
A tf2onnx maxout (Max of two convolutions) then runs QLinearConv, QLinearConv, Max(uint8), QLinearConv.
"""

from __future__ import annotations

import onnx

from compressq.graph.edit import remove_unused
from compressq.graph.index import GraphIndex
from compressq.quantize.plan import SELECT_OPS

INTEGER_SELECT_OPSET = 12  # Max/Min take int8/uint8 from opset 12 on


def select_on_integers(graph: onnx.GraphProto, opset: int) -> int:
    """Rewrite every eligible DQ -> Max/Min -> Q in `graph` (in place); returns how many were rewritten."""
    if opset < INTEGER_SELECT_OPSET:
        return 0
    index = GraphIndex(graph)
    rewritten = 0
    for node in graph.node:
        if node.op_type not in SELECT_OPS:
            continue
        inputs = [index.producer.get(name) for name in node.input]
        quantize = index.single_consumer(node.output[0])
        dequantized = [producer for producer in inputs if producer is not None]
        if quantize is None or len(dequantized) != len(inputs) or not _same_parameters(dequantized, quantize) \
                or node.output[0] in _graph_outputs(graph):
            continue
        node.input[:] = [dequantize.input[0] for dequantize in dequantized]
        node.output[0] = quantize.output[0]
        quantize.output[0] = ""  # the QuantizeLinear now computes nothing anyone reads
        rewritten += 1
    if rewritten:
        kept = [n for n in graph.node if not (n.op_type == "QuantizeLinear" and not n.output[0])]
        del graph.node[:]
        graph.node.extend(kept)
        remove_unused(graph)  # DequantizeLinear nodes only the Max read
    return rewritten


def _same_parameters(inputs: list[onnx.NodeProto], quantize: onnx.NodeProto) -> bool:
    """Every input is a DequantizeLinear and the only reader of the output a QuantizeLinear, all five
    with the same scale and zero-point tensors (by name: the rewrite shares them within a group) and the
    same (per-tensor) layout."""
    if quantize.op_type != "QuantizeLinear" or len(quantize.input) < 3:
        return False
    parameters = tuple(quantize.input[1:3])
    for dequantize in inputs:
        if dequantize.op_type != "DequantizeLinear" or tuple(dequantize.input[1:3]) != parameters:
            return False
        if any(attribute.name in ("axis", "block_size") for attribute in dequantize.attribute):
            return False
    return not any(attribute.name in ("axis", "block_size", "saturate") for attribute in quantize.attribute)


def _graph_outputs(graph: onnx.GraphProto) -> set[str]:
    return {output.name for output in graph.output}

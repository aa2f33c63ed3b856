"""fp16 models: quantized in float32 inside, fp16 at the interface and on disk.

onnxruntime's integer kernels (QLinearConv, MatMulInteger, ...) dequantize to float32, and its CPU
provider runs most fp16 ops by casting to float32 anyway. So an fp16 model is widened first: every fp16
weight, Cast target, constant and intermediate type becomes float32, while the graph inputs and outputs
keep fp16 through one Cast each. After quantization the float weights that were fp16 and stayed float are
narrowed back: an fp16 initializer read through a Cast, which onnxruntime folds when the session starts.
The output keeps the input's interface and is never bigger because of the widening.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressq.errors import UsageError
from compressq.graph.edit import NameGenerator, toposort
from compressq.graph.index import all_nodes, scopes

FLOAT16 = TensorProto.FLOAT16
FLOAT = TensorProto.FLOAT
# Attributes that name an element type (Cast's target, random generators, EyeLike).
TYPE_ATTRIBUTES = ("to", "dtype")
NARROWED_MARK = "_fp16"


def holds_float16(model: onnx.ModelProto) -> bool:
    """Whether any weight, interface tensor, cast or constant of the model is fp16."""
    graph = model.graph
    if any(t.data_type == FLOAT16 for t in graph.initializer):
        return True
    if any(v.type.tensor_type.elem_type == FLOAT16 for v in [*graph.input, *graph.output]):
        return True
    return any(_node_names_float16(node) for node in all_nodes(graph))


def widen(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A float32 copy of `model` whose fp16 inputs and outputs stay fp16 (one Cast each); also the names
    of the initializers that were fp16 (what `narrow` may store as fp16 again). `model` is untouched."""
    if len(scopes(model.graph)) > 1:
        raise UsageError("this fp16 model has If/Loop/Scan bodies, which compressq cannot quantize in fp16",
                         hint="quantize the float32 export of the model (fp16 conversion can follow)")
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    was_float16 = set()
    for position, tensor in enumerate(graph.initializer):
        if tensor.data_type == FLOAT16:
            graph.initializer[position].CopyFrom(_as_float32(tensor))
            was_float16.add(tensor.name)
    for node in graph.node:
        _widen_node(node)
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == FLOAT16:
            value.type.tensor_type.elem_type = FLOAT
    names = NameGenerator(graph)
    _cast_interface(graph, names)
    toposort(graph)
    return wide, was_float16


def narrow(model: onnx.ModelProto, was_float16: set[str]) -> onnx.ModelProto:
    """Store the float32 weights that were fp16 (and stayed float) as fp16 again, read through a Cast;
    in place, returns `model`."""
    graph = model.graph
    names = NameGenerator(graph)
    casts = []
    for position, tensor in enumerate(graph.initializer):
        if tensor.name not in was_float16 or tensor.data_type != FLOAT:
            continue
        name, values = tensor.name, numpy_helper.to_array(tensor)
        stored = names(name + NARROWED_MARK)
        graph.initializer[position].CopyFrom(numpy_helper.from_array(values.astype(np.float16), stored))
        casts.append(helper.make_node("Cast", [stored], [name], to=FLOAT, name=names(f"{name}_Cast")))
    if casts:
        graph.node.extend(casts)
        toposort(graph)
    return model


def _as_float32(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def _node_names_float16(node: onnx.NodeProto) -> bool:
    for attribute in node.attribute:
        if attribute.name in TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT \
                and attribute.i == FLOAT16:
            return True
        if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == FLOAT16:
            return True
    return False


def _widen_node(node: onnx.NodeProto) -> None:
    for attribute in node.attribute:
        if attribute.name in TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT \
                and attribute.i == FLOAT16:
            attribute.i = FLOAT
        elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == FLOAT16:
            attribute.t.CopyFrom(_as_float32(attribute.t))


def _cast_interface(graph: onnx.GraphProto, names: NameGenerator) -> None:
    """fp16 graph inputs are cast to float32 for their readers; fp16 outputs are cast from a float32
    tensor their producer now writes. The interface's names, types and order stay as they were."""
    inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type == FLOAT16}
    outputs = {v.name for v in graph.output if v.type.tensor_type.elem_type == FLOAT16}
    renamed_inputs = {name: names(f"{name}_float32") for name in inputs}
    renamed_outputs = {name: names(f"{name}_float32") for name in outputs - inputs}  # a passed-through input stays
    for node in graph.node:
        node.input[:] = [renamed_inputs.get(i, renamed_outputs.get(i, i)) for i in node.input]
        node.output[:] = [renamed_outputs.get(o, o) for o in node.output]
    for name, wide in renamed_inputs.items():
        graph.node.append(helper.make_node("Cast", [name], [wide], to=FLOAT, name=names(f"{name}_to_float32")))
    for name, wide in renamed_outputs.items():
        graph.node.append(helper.make_node("Cast", [wide], [name], to=FLOAT16, name=names(f"{name}_to_float16")))


def quantize_widened(model: onnx.ModelProto, quantize):
    """Run `quantize` (a model -> QuantizeResult function) on the widened model; the result keeps the
    fp16 interface, stores its float weights as fp16, and is `model` itself when nothing was quantized."""
    wide, was_float16 = widen(model)
    result = quantize(wide)
    if not result.summary.quantized_nodes:
        result.model = model  # nothing gained: the user's fp16 model as it came, never the wider copy
        return result
    narrow(result.model, was_float16)
    result.summary.notes.append("fp16 model: quantized with float32 inside; inputs and outputs stay fp16 and "
                                "weights left in float are stored as fp16")
    return result

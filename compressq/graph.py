"""Graph helpers: an index of producers and consumers, value types, naming, toposort and cleanup.

Loading and saving live in compressq.io; the names below are re-exported so that
`from compressq.graph import load_model` keeps working.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from compressq.errors import ModelError
from compressq.io import (  # noqa: F401  (re-exported: compressq.graph was the I/O module before io.py)
    EXTERNAL_DATA_THRESHOLD,
    METADATA_PREFIX,
    PROTOBUF_LIMIT,
    _first_line,
    check_model,
    check_output_path,
    default_output_path,
    file_size,
    iter_tensors,
    load_model,
    model_tensors,
    read_stamp,
    save_model,
    stamp,
)

# ---------------------------------------------------------------------------------------------------
# Reading graphs


class GraphIndex:
    """Producers, consumers and constants of one graph, built once and queried by name."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for output in node.output:
                if output:
                    self.producer[output] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in graph.output]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or (
            name in self.producer and self.producer[name].op_type == "Constant")

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None


def node_attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return 0


def ensure_opset(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """A copy of `model` at default-domain opset >= `minimum` (converted when older)."""
    if opset_version(model) >= minimum:
        return model
    try:
        return onnx.version_converter.convert_version(model, minimum)
    except Exception as exc:  # the converter raises bare RuntimeErrors for unsupported ops
        raise ModelError(
            f"the model uses opset {opset_version(model)}; converting it to {minimum} failed: "
            f"{_first_line(exc)}",
            hint=f"re-export the model with opset >= {minimum}",
        ) from exc


@dataclass(frozen=True)
class TensorType:
    elem_type: int
    shape: tuple[int | str | None, ...] | None

    @property
    def dtype(self) -> np.dtype | None:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))
        except (KeyError, TypeError, ValueError):
            return None


def value_type(value: onnx.ValueInfoProto) -> TensorType:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return TensorType(tensor.elem_type, None)
    dims: list[int | str | None] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorType(tensor.elem_type, tuple(dims))


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred copy; falls back to the unannotated model when inference rejects it."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # shape inference fails on some custom-domain ops; shapes are a nicety there
        return model


def tensor_types(model: onnx.ModelProto) -> dict[str, TensorType]:
    """Element type and shape of every named tensor that shape inference could type."""
    inferred = infer_shapes(model)
    graph = inferred.graph
    types = {v.name: value_type(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    for tensor in graph.initializer:
        types[tensor.name] = TensorType(tensor.data_type, tuple(tensor.dims))
    return types


# ---------------------------------------------------------------------------------------------------
# Editing graphs


class NameGenerator:
    """Fresh tensor/node names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken: set[str] = set()
        for node in graph.node:
            self.taken.update(node.output)
            self.taken.update(node.input)
            self.taken.add(node.name)
        self.taken.update(t.name for t in graph.initializer)
        self.taken.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])

    def __call__(self, base: str) -> str:
        name, counter = base, 1
        while name in self.taken:
            name = f"{base}_{counter}"
            counter += 1
        self.taken.add(name)
        return name


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder graph.node so that every node follows the producers of its inputs (in place)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        still_pending = []
        for node in pending:
            if all(name in available for name in _node_dependencies(node)):
                ordered.append(node)
                available.update(node.output)
            else:
                still_pending.append(node)
        if len(still_pending) == len(pending):
            missing = sorted({n for node in pending for n in _node_dependencies(node)} - available)
            raise ModelError(f"graph has a cycle or dangling inputs: {', '.join(missing[:5])}")
        pending = still_pending
    del graph.node[:]
    graph.node.extend(ordered)


def _node_dependencies(node: onnx.NodeProto) -> list[str]:
    # A subgraph body (If/Loop/Scan) may read tensors of the enclosing graph: those count too.
    names = list(node.input)
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            produced = {n for sub in subgraph.node for n in sub.output}
            local = produced | {i.name for i in subgraph.input} | {t.name for t in subgraph.initializer}
            names.extend(n for sub in subgraph.node for n in sub.input if n and n not in local)
    return names


def remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers and value_info that no graph output depends on (in place)."""
    needed = {o.name for o in graph.output}
    kept_nodes = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept_nodes.append(node)
            needed.update(_node_dependencies(node))
    kept_nodes.reverse()
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept_inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    produced = {n for node in graph.node for n in node.output}
    kept_info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)

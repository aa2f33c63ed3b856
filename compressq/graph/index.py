"""Reading graphs: producers and consumers, value types, opsets."""

from __future__ import annotations

import difflib
import fnmatch
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from compressq.errors import UsageError

# ---------------------------------------------------------------------------------------------------
# Reading graphs


class GraphIndex:
    """Producers, consumers and constants of one graph, built once and queried by name.

    A node whose bodies (If/Loop/Scan) read a tensor of this graph counts as one of its consumers. In a
    body, `outer` holds the initializers of the enclosing graphs it can read (its own ones shadow them).
    """

    def __init__(self, graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto] | None = None):
        self.graph = graph
        local = {t.name: t for t in graph.initializer}
        self.initializers: dict[str, onnx.TensorProto] = {**(outer or {}), **local}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for output in node.output:
                if output:
                    self.producer[output] = node
            for name in dict.fromkeys([*node.input, *implicit_inputs(node)]):
                if name:
                    self.consumers[name].append(node)
        self.graph_inputs = [i.name for i in graph.input if i.name not in local]
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

    def weight(self, name: str) -> np.ndarray:
        """The value of a constant a plan already found (an initializer or a Constant node's output)."""
        value = self.constant(name)
        assert value is not None, f"'{name}' was planned as a constant but is not one"
        return value

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or (
            name in self.producer and self.producer[name].op_type == "Constant")

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None


# ---------------------------------------------------------------------------------------------------
# Subgraphs: If branches, Loop and Scan bodies


@dataclass(frozen=True, eq=False)
class Scope:
    """One graph of a model: the main graph, or a body of an If/Loop/Scan node (at any depth)."""

    graph: onnx.GraphProto
    label: str                          # "main graph", "If 'vad' then_branch", "Loop 'l' body > If 'x' ..."
    owner: onnx.NodeProto | None = None  # the If/Loop/Scan node holding this body
    attribute: str = ""                 # then_branch, else_branch or body
    parent: Scope | None = None

    @property
    def is_main(self) -> bool:
        return self.owner is None

    def outer_initializers(self) -> dict[str, onnx.TensorProto]:
        """Initializers of the enclosing graphs this body can read (inner ones shadow outer ones)."""
        found: dict[str, onnx.TensorProto] = {}
        scope = self.parent
        while scope is not None:
            found = {**{t.name: t for t in scope.graph.initializer}, **found}
            scope = scope.parent
        return found

    def index(self) -> GraphIndex:
        return GraphIndex(self.graph, self.outer_initializers())


MAIN_GRAPH = "main graph"


def bodies(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) of every subgraph a node holds."""
    found = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            found.append((attribute.name, attribute.g))
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            found.extend((attribute.name, graph) for graph in attribute.graphs)
    return found


def scopes(graph: onnx.GraphProto) -> list[Scope]:
    """The main graph, then every body inside it, depth first (a parent before its children)."""
    found = [Scope(graph, MAIN_GRAPH)]
    position = 0
    while position < len(found):
        parent = found[position]
        children = []
        for node in parent.graph.node:
            for attribute, body in bodies(node):
                where = f"{node.op_type} '{node.name}' {attribute}"
                label = where if parent.is_main else f"{parent.label} > {where}"
                children.append(Scope(body, label, node, attribute, parent))
        found[position + 1:position + 1] = children
        position += 1
    return found


def all_nodes(graph: onnx.GraphProto):
    """Nodes of a graph and of every subgraph inside it (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for _, body in bodies(node):
            yield from all_nodes(body)


def implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Tensors of the enclosing graph that a node's bodies read (at any depth), in first-use order."""
    names: dict[str, None] = {}
    for _, body in bodies(node):
        local = {i.name for i in body.input} | {t.name for t in body.initializer}
        local.update(o for inner in body.node for o in inner.output)
        for inner in body.node:
            for name in [*inner.input, *implicit_inputs(inner)]:
                if name and name not in local:
                    names[name] = None
    return list(names)


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in a graph and its bodies: fresh names must avoid them all."""
    taken: set[str] = set()
    for scope in scopes(graph):
        body = scope.graph
        for node in body.node:
            taken.update(node.input)
            taken.update(node.output)
            taken.add(node.name)
        taken.update(t.name for t in body.initializer)
        taken.update(v.name for v in [*body.input, *body.output, *body.value_info])
    return taken


def node_attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return 0


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


# ---------------------------------------------------------------------------------------------------
# --exclude: one meaning for every command


def exclusion_names(node: onnx.NodeProto) -> tuple[str, ...]:
    """What an --exclude glob is matched against: the node's name, its op type and its weight's name."""
    weight = node.input[1:2] if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") else []
    return tuple(text for text in (node.name, node.op_type, *weight) if text)


def excluded_by(node: onnx.NodeProto, patterns: Iterable[str]) -> str | None:
    """The first pattern that matches the node, or None."""
    return first_match(exclusion_names(node), patterns)


def first_match(names: Iterable[str], patterns: Iterable[str]) -> str | None:
    names = [text for text in names if text]
    return next((p for p in patterns if any(fnmatch.fnmatchcase(text, p) for text in names)), None)


def unmatched_exclusion(graph: onnx.GraphProto, patterns: Iterable[str]) -> tuple[str, list[str]] | None:
    """The first pattern that matches no node of the graph or its bodies, with the names closest to it."""
    names = sorted({text for node in all_nodes(graph) for text in exclusion_names(node)})
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(text, pattern) for text in names):
            return pattern, difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    return None


def check_exclude(graph: onnx.GraphProto, patterns: Iterable[str]) -> None:
    """An --exclude pattern that matches nothing is a typo, not a no-op: one line naming the closest names."""
    unmatched = unmatched_exclusion(graph, patterns)
    if unmatched is None:
        return
    pattern, close = unmatched
    hint = ("closest: " + ", ".join(close)) if close else "see the node names with compressq inspect MODEL --json"
    raise UsageError(f"--exclude '{pattern}' matches no node name, op type or weight name",
                     hint=hint + "; patterns are globs, e.g. '/classifier/*' or Gemm")

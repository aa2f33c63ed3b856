"""Editing graphs: fresh names, topological order, removing what nothing uses, opset upgrades."""

from __future__ import annotations

import hashlib
from collections.abc import Collection

import numpy as np
import onnx
from onnx import numpy_helper

from compressq.errors import ModelError
from compressq.graph.index import Scope, all_nodes, implicit_inputs, opset_version, scopes, tensor_names
from compressq.io import first_line


def ensure_opset(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """A copy of `model` at default-domain opset >= `minimum` (converted when older)."""
    if opset_version(model) >= minimum:
        return model
    try:
        return _converted_without_weights(model, minimum) or onnx.version_converter.convert_version(model, minimum)
    except Exception as exc:  # the converter raises bare RuntimeErrors for unsupported ops
        raise ModelError(
            f"the model uses opset {opset_version(model)}; converting it to {minimum} failed: "
            f"{first_line(exc)}",
            hint=f"re-export the model with opset >= {minimum}",
        ) from exc


SKELETON_TENSOR_BYTES = 64 * 1024


def _converted_without_weights(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto | None:
    """The converter serializes and parses the whole model (twice the weights, at once): it is handed the
    graph with its big weights emptied (type and dims kept), and the weights are copied into its result.
    None when the result does not keep every weight by name (then the whole model is converted)."""
    big = {t.name: t for t in model.graph.initializer if t.ByteSize() >= SKELETON_TENSOR_BYTES}
    skeleton = copy_model(model, drop_initializers=set(big))
    del skeleton.graph.initializer[:]
    for tensor in model.graph.initializer:  # same order as the original: the same output bytes
        if tensor.name in big:
            skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            skeleton.graph.initializer.append(tensor)
    converted = onnx.version_converter.convert_version(skeleton, minimum)
    placeholders = [t for t in converted.graph.initializer if t.name in big]
    if len(placeholders) != len(big):
        return None
    for tensor in placeholders:
        tensor.CopyFrom(big[tensor.name])
    return converted


class NameGenerator:
    """Fresh tensor/node names that collide with nothing in the graph or its If/Loop/Scan bodies."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken: set[str] = tensor_names(graph)

    def __call__(self, base: str) -> str:
        name, counter = base, 1
        while name in self.taken:
            name = f"{base}_{counter}"
            counter += 1
        self.taken.add(name)
        return name


def copy_model(model: onnx.ModelProto, *, drop_initializers: set[str] | frozenset[str] = frozenset()
               ) -> onnx.ModelProto:
    """A copy of `model` whose main graph leaves out the named initializers: a pass that replaces big
    weights copies everything else, never the weights it is about to drop (protobuf keeps a dropped field's
    bytes in the copy's arena until the whole copy is freed)."""
    result = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(result, field, value)
    for field, value in model.graph.ListFields():
        if field.name == "initializer":
            result.graph.initializer.extend(t for t in value if t.name not in drop_initializers)
        else:
            _copy_field(result.graph, field, value)
    return result


def transplant_nodes(model: onnx.ModelProto, donor: onnx.ModelProto, outputs: Collection[str]) -> onnx.ModelProto:
    """A copy of `model` in which each main-graph node whose first output is in `outputs` is replaced by the
    `donor`'s node producing that tensor, with the donor initializers it reads (renamed where `model` already
    uses the name); what the replaced nodes alone read is dropped. Two variants of one rewrite are mixed this way
    (e.g. 4-bit and 8-bit weights), no weight copied but those that move."""
    wanted = set(outputs)
    donors = {node.output[0]: node for node in donor.graph.node if node.output and node.output[0] in wanted}
    missing = sorted(wanted - set(donors))
    if missing:
        raise ModelError(f"no node of the donor model produces '{missing[0]}'")
    donor_weights = {tensor.name: tensor for tensor in donor.graph.initializer}
    result = copy_model(model)
    names = NameGenerator(result.graph)
    renamed: dict[str, str] = {}
    for node in result.graph.node:
        if not node.output or node.output[0] not in wanted:
            continue
        node.CopyFrom(donors[node.output[0]])
        for position, name in enumerate(node.input):
            if name not in donor_weights:
                continue
            if name not in renamed:
                renamed[name] = names(name)
                tensor = result.graph.initializer.add()
                tensor.CopyFrom(donor_weights[name])
                tensor.name = renamed[name]
            node.input[position] = renamed[name]
    remove_unused(result.graph)
    return result


def _copy_field(target, field, value) -> None:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; older versions only have the label
    if repeated if repeated is not None else field.label == field.LABEL_REPEATED:
        getattr(target, field.name).extend(value)
    elif field.message_type is not None:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def toposort(graph: onnx.GraphProto, outer: set[str] | frozenset[str] = frozenset()) -> None:
    """Reorder graph.node so that every node follows the producers of its inputs (in place). In a body,
    `outer` names the enclosing graphs' tensors it may read."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""} | set(outer)
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
    # A subgraph body (If/Loop/Scan) may read tensors of the enclosing graph, at any depth: those count too.
    return [*node.input, *implicit_inputs(node)]


def remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers and value_info that no graph output depends on (in place)."""
    needed = {o.name for o in graph.output}
    nodes = list(graph.node)
    unused = set()
    for position in reversed(range(len(nodes))):
        if any(o in needed for o in nodes[position].output):
            needed.update(_node_dependencies(nodes[position]))
        else:
            unused.add(position)
    for position in sorted(unused, reverse=True):
        del graph.node[position]
    _delete_where(graph.initializer, lambda tensor: tensor.name not in needed)
    produced = {n for node in graph.node for n in node.output}
    _delete_where(graph.value_info, lambda value: value.name not in produced)


def _delete_where(field, unwanted) -> None:
    """Delete the entries of a repeated field that are `unwanted`, in place: clearing the field and adding back
    the kept ones would copy every kept entry (every weight, for initializers: BERT-6's 180 MB a call)."""
    for position in reversed(range(len(field))):
        if unwanted(field[position]):
            del field[position]


def share_duplicate_initializers(graph: onnx.GraphProto, min_elements: int = 1024) -> int:
    """Bodies holding the same constant under different names keep one copy, in their closest common
    enclosing graph (in place); returns the number of copies removed.

    onnxruntime's constant folding materializes a reshaped outer weight in every branch that reshapes it
    (the voice-activity model's LSTM weights came out twice per rate branch, 1 MB more than the input)."""
    found = scopes(graph)
    groups: dict[tuple, list[tuple[Scope, onnx.TensorProto]]] = {}
    for scope in found[1:]:
        outputs = {o.name for o in scope.graph.output}
        for tensor in scope.graph.initializer:
            if int(np.prod(tensor.dims)) >= min_elements and tensor.name not in outputs:
                digest = hashlib.sha256(numpy_helper.to_array(tensor).tobytes()).hexdigest()
                groups.setdefault((tensor.data_type, tuple(tensor.dims), digest), []).append((scope, tensor))
    removed = 0
    for copies in groups.values():
        if len({id(scope.graph) for scope, _ in copies}) < 2:
            continue
        home = _common_enclosing(copies[0][0], [scope for scope, _ in copies[1:]])
        kept = onnx.TensorProto()
        kept.CopyFrom(copies[0][1])
        for scope, tensor in copies:
            _rename_reads(scope.graph, tensor.name, kept.name)
            _drop_initializer(scope.graph, tensor.name)
            removed += 1
        home.graph.initializer.append(kept)
        removed -= 1
    return removed


def _common_enclosing(first: Scope, others: list[Scope]) -> Scope:
    chain = []
    scope: Scope | None = first
    while scope is not None:
        chain.append(scope)
        scope = scope.parent
    for other in others:
        ancestors = set()
        scope = other
        while scope is not None:
            ancestors.add(id(scope.graph))
            scope = scope.parent
        chain = [s for s in chain if id(s.graph) in ancestors]
    return chain[0]


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of `old` in a graph and its bodies now reads `new` (names are unique model-wide)."""
    if old == new:
        return
    for node in all_nodes(graph):
        for position, name in enumerate(node.input):
            if name == old:
                node.input[position] = new


def _drop_initializer(graph: onnx.GraphProto, name: str) -> None:
    kept = [t for t in graph.initializer if t.name != name]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def name_nodes(graph: onnx.GraphProto) -> int:
    """Give every unnamed node, and every repeat of a name, a unique name, bodies included (in place), so
    --exclude, plans and reports can name every node; returns how many were (re)named."""
    nodes = list(all_nodes(graph))
    taken = {node.name for node in nodes if node.name}
    seen: set[str] = set()
    counters: dict[str, int] = {}
    renamed = 0
    for node in nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        stem = node.name or node.op_type or "node"
        number = counters.get(stem, 0)
        while f"{stem}_{number}" in taken:
            number += 1
        node.name = f"{stem}_{number}"
        counters[stem] = number + 1
        taken.add(node.name)
        seen.add(node.name)
        renamed += 1
    return renamed

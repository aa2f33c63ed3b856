"""The contract every graph transformation keeps, and the way passes are run under it.

A pass takes a model and returns `PassResult(model, modified, skipped)`: the new model (the input is never
modified), the nodes it changed, and the nodes it looked at and left alone, each with its reason (`details`
carries the pass's own report). An algorithm written as `model -> (model, report)` becomes a pass through
`as_pass`, which reads what changed off the two graphs and the reasons off the report. Its
postcondition: onnx.checker passes and the model's interface is unchanged (inputs and outputs: names,
element types, order, shapes up to symbolic dims). The check costs a checker run, so it runs in the tests
(COMPRESSQ_CHECK_PASSES=1, set by tests/conftest.py) and under `--debug`; a failure is a bug of ours (exit 3).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

# Above this, onnx.checker cannot check a model in memory (protobuf's 2 GB limit, with headroom).
IN_MEMORY_CHECK_LIMIT = int(1.8 * 2**30)

_checks = {"on": os.environ.get("COMPRESSQ_CHECK_PASSES") == "1"}


def enable_checks(on: bool = True) -> None:
    _checks["on"] = on


def checks_enabled() -> bool:
    return _checks["on"]


class InterfaceChanged(AssertionError):
    """A transformation changed the model's inputs or outputs: a bug of ours (exit 3), never the user's."""


# ---------------------------------------------------------------------------------------------------
# The interface


Dim = int | str | None  # a fixed size, a symbolic name, or unknown


@dataclass(frozen=True)
class Port:
    """One graph input or output as a caller sees it."""

    name: str
    elem_type: int | None          # onnx.TensorProto element type; None for non-tensor values
    dims: tuple[Dim, ...] | None   # None: rank unknown

    def matches(self, other: Port) -> bool:
        """Same name and type; same rank and fixed sizes (a symbolic or unknown dim matches any non-fixed one)."""
        if (self.name, self.elem_type) != (other.name, other.elem_type):
            return False
        if self.dims is None or other.dims is None:
            return self.dims is None and other.dims is None
        if len(self.dims) != len(other.dims):
            return False
        return all((a == b) if isinstance(a, int) or isinstance(b, int) else True
                   for a, b in zip(self.dims, other.dims))

    def text(self) -> str:
        kind = onnx.TensorProto.DataType.Name(self.elem_type) if self.elem_type else "non-tensor"
        shape = "?" if self.dims is None else "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"
        return f"{self.name} {kind}{shape}"


@dataclass(frozen=True)
class Interface:
    inputs: tuple[Port, ...]   # the inputs a caller feeds: initializers listed as inputs are not among them
    outputs: tuple[Port, ...]


def interface(model: onnx.ModelProto) -> Interface:
    graph = model.graph
    weights = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    return Interface(tuple(_port(v) for v in graph.input if v.name not in weights),
                     tuple(_port(v) for v in graph.output))


def _port(value: onnx.ValueInfoProto) -> Port:
    if not value.type.HasField("tensor_type"):
        return Port(value.name, None, None)
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return Port(value.name, tensor.elem_type, None)
    dims = tuple(_dim(d) for d in tensor.shape.dim)
    return Port(value.name, tensor.elem_type, dims)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    """A fixed size, a symbolic name, or None; exporters write -1 for "unknown" (PaddlePaddle), which onnx
    shape inference then drops: it is unknown, not a size."""
    if dim.HasField("dim_value"):
        return dim.dim_value if dim.dim_value >= 0 else None
    return dim.dim_param or None


def check_interface(before: Interface, after: Interface, what: str) -> None:
    """Raise InterfaceChanged naming the first difference between two interfaces."""
    for role, old, new in (("inputs", before.inputs, after.inputs), ("outputs", before.outputs, after.outputs)):
        if len(old) != len(new):
            raise InterfaceChanged(f"{what} changed the number of model {role}: {len(old)} -> {len(new)} "
                                   f"({', '.join(p.name for p in old)} -> {', '.join(p.name for p in new)})")
        for position, (a, b) in enumerate(zip(old, new)):
            if not a.matches(b):
                raise InterfaceChanged(f"{what} changed model {role[:-1]} {position}: {a.text()} -> {b.text()}")


def check_contract(before: onnx.ModelProto | Interface, after: onnx.ModelProto, what: str) -> None:
    """The postcondition of every pass: onnx.checker passes and the interface is unchanged."""
    expected = before if isinstance(before, Interface) else interface(before)
    check_interface(expected, interface(after), what)
    from compressq.io import is_external, model_bytes, model_tensors  # ByteSize() fails past 2 GB (EncodeError)

    # A proto whose weights still point at files (loaded without its weights) was checked from its path; in
    # memory the checker would look for those files relative to the current directory.
    points_at_files = any(is_external(stored.tensor) for stored in model_tensors(after))
    if not points_at_files and model_bytes(after) <= IN_MEMORY_CHECK_LIMIT:
        try:
            onnx.checker.check_model(after)
        except (onnx.checker.ValidationError, ValueError) as exc:
            raise InterfaceChanged(f"{what} left a model that fails the ONNX checker: "
                                   f"{str(exc).strip().splitlines()[0][:300]}") from exc


# ---------------------------------------------------------------------------------------------------
# Running passes


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: list[str] = field(default_factory=list)   # node names changed or added
    skipped: list[Any] = field(default_factory=list)    # entries with .node, .op_type and .reason
    details: Any = None                                 # the pass's own report (what it did, in its terms)


@dataclass(frozen=True)
class Skip:
    node: str
    op_type: str
    reason: str


def as_pass(transform: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, Any]],
            reasons: Callable[[Any], Mapping[str, str]] | None = None) -> Callable[[onnx.ModelProto], PassResult]:
    """`transform(model) -> (new model, report)` as a pass: `modified` is every main-graph node the new model
    adds or rewrites, `skipped` the report's `reasons(report)` (node or tensor name -> why it was left alone)."""
    def run(model: onnx.ModelProto) -> PassResult:
        result, report = transform(model)
        skipped = skips(model, reasons(report)) if reasons is not None else []
        return PassResult(result, changed_nodes(model, result), skipped, report)
    return run


def changed_nodes(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """Names of the main-graph nodes of `after` that `before` does not have as they are (added or rewritten)."""
    old = {node.name: node for node in before.graph.node}
    return [node.name for node in after.graph.node if node.name not in old or old[node.name] != node]


def skips(model: onnx.ModelProto, reasons: Mapping[str, str]) -> list[Skip]:
    """Reasons by node name, or by tensor name (the node that produces it), as Skip entries."""
    nodes = {node.name: node for node in model.graph.node}
    producers = {output: node for node in model.graph.node for output in node.output}
    found = []
    for name, reason in reasons.items():
        node = nodes.get(name)
        if node is not None:
            found.append(Skip(node.name, node.op_type, reason))
        elif name in producers:
            found.append(Skip(producers[name].name, producers[name].op_type, f"{name}: {reason}"))
        else:  # a graph input or a weight
            found.append(Skip(name, "", reason))
    return found


def run_pass(what: str, transform: Callable[[onnx.ModelProto], PassResult], model: onnx.ModelProto) -> PassResult:
    """`transform(model)`, with its postcondition checked when checks are on."""
    before = interface(model) if checks_enabled() else None
    result = transform(model)
    if before is not None:
        check_contract(before, result.model, what)
    return result


def check_if_enabled(before: onnx.ModelProto, after: onnx.ModelProto, what: str) -> None:
    """The postcondition of a whole pipeline (quantize, prune), when checks are on."""
    if checks_enabled():
        check_contract(before, after, what)

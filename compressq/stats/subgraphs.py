"""Calibration inside If branches and Loop/Scan bodies.

onnxruntime can only return tensors of the main graph, so a tensor that lives in a body is measured where it
lives: a ReduceMin/ReduceMax pair next to it, and the two scalars carried out to main-graph outputs, level by
level for nested bodies:
  * If: both branches get the same new outputs; the branch that lacks the tensor outputs +inf (for the
    minimum) and -inf (for the maximum), the neutral values of min and max, so merging ignores it and a run
    that took the other branch says "not seen" (min = +inf and max = -inf together);
  * Loop and Scan: the scalars become scan outputs (one per iteration), reduced again in the enclosing graph.
A tensor name defined in several bodies (sibling branches may reuse names) is probed in each; its range is
the union of what ran. Only minimum and maximum are observed in bodies: histograms would need every value
carried out, so percentile/entropy/MSE ranges fall back to min/max there (the caller says so).
compressq.stats.collect runs the probes in the same pass as the main graph's reductions and feeds each
decoded (min, max) to the tensor's MinMaxObserver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from compressq.graph.index import Scope, infer_shapes, scopes, tensor_names

# Never reached by the data (a branch no sample took): no range can be known, the tensor stays float.


@dataclass(frozen=True)
class BodyProbe:
    tensor: str
    scope: str        # where it was measured, e.g. "If 'vad' then_branch"
    low_output: str   # main-graph output carrying its minimum
    high_output: str  # ... and its maximum


@dataclass
class BodyProbes:
    """An augmented copy of a model whose extra main-graph outputs carry min/max of tensors in bodies."""

    model: onnx.ModelProto
    probes: list[BodyProbe] = field(default_factory=list)

    @property
    def outputs(self) -> list[str]:
        return [name for probe in self.probes for name in (probe.low_output, probe.high_output)]

    def decode(self, fetched: Mapping[str, np.ndarray]) -> dict[str, tuple[float, float]]:
        """One run's fetched outputs -> (min, max) per tensor over what ran; tensors only in bodies that did
        not run this time are absent."""
        found: dict[str, tuple[float, float]] = {}
        for probe in self.probes:
            low, high = float(fetched[probe.low_output]), float(fetched[probe.high_output])
            if low == np.inf and high == -np.inf:
                continue  # the untaken branch's neutral values (or an empty tensor): nothing seen
            if probe.tensor in found:
                before = found[probe.tensor]
                low, high = float(np.fmin(before[0], low)), float(np.fmax(before[1], high))
                if np.isnan(before[0]) or np.isnan(before[1]):
                    low, high = np.nan, np.nan
            found[probe.tensor] = (low, high)
        return found


def split_by_scope(model: onnx.ModelProto, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(names the main graph can return, names that exist only inside bodies). Unknown names count as main
    (the caller's session reports them)."""
    graph = model.graph
    main = _defined(graph)
    in_bodies: set[str] = set()
    for scope in scopes(graph)[1:]:
        in_bodies |= _defined(scope.graph)
    wanted = sorted(set(names))
    inner = [n for n in wanted if n not in main and n in in_bodies]
    return [n for n in wanted if n not in inner], inner


def probe_bodies(model: onnx.ModelProto, names: Iterable[str]) -> BodyProbes:
    """A copy of `model` that also returns min and max of every named tensor living in a body."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    probes = BodyProbes(augmented)
    _, inner = split_by_scope(augmented, names)
    if not inner:
        return probes
    taken = tensor_names(augmented.graph)
    fresh = _fresh_names(taken)
    wanted = set(inner) - _not_float(augmented)
    for scope in scopes(augmented.graph):
        if scope.is_main:
            continue
        for tensor in sorted(wanted & _defined(scope.graph)):
            low, high = _reduce(scope.graph, tensor, fresh)
            low, high = _carry_out(scope, low, high, fresh)
            probes.probes.append(BodyProbe(tensor, scope.label, low, high))
    return probes


# ---------------------------------------------------------------------------------------------------
# Graph surgery


def _not_float(model: onnx.ModelProto) -> set[str]:
    """Tensors that shape inference types as something else than floating point (conditions, indices):
    min and max of those mean nothing to quantization."""
    floating = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    found = set()
    for scope in scopes(infer_shapes(model).graph):
        for value in [*scope.graph.input, *scope.graph.value_info, *scope.graph.output]:
            elem_type = value.type.tensor_type.elem_type
            if elem_type and elem_type not in floating:
                found.add(value.name)
        found.update(t.name for t in scope.graph.initializer if t.data_type not in floating)
    return found


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names.update(o for node in graph.node for o in node.output if o)
    return names


def _fresh_names(taken: set[str]) -> Callable[[str], str]:
    def fresh(base: str) -> str:
        name, counter = base, 1
        while name in taken:
            name, counter = f"{base}_{counter}", counter + 1
        taken.add(name)
        return name
    return fresh


def _reduce(graph: onnx.GraphProto, tensor: str, fresh: Callable[[str], str]) -> tuple[str, str]:
    """Float scalars min(tensor), max(tensor) computed in `graph`."""
    results = []
    for op, suffix in (("ReduceMin", "min"), ("ReduceMax", "max")):
        raw, value = fresh(f"{tensor}_probe_{suffix}_raw"), fresh(f"{tensor}_probe_{suffix}")
        graph.node.extend([
            helper.make_node(op, [tensor], [raw], keepdims=0, name=fresh(f"{tensor}_probe_{op}")),
            helper.make_node("Cast", [raw], [value], to=TensorProto.FLOAT, name=fresh(f"{tensor}_probe_{suffix}_cast")),
        ])
        results.append(value)
    return results[0], results[1]


def _carry_out(scope: Scope, low: str, high: str, fresh: Callable[[str], str]) -> tuple[str, str]:
    """Carry two scalars of a body up to main-graph outputs; returns their names there."""
    while scope.owner is not None and scope.parent is not None:
        owner, parent = scope.owner, scope.parent
        _add_scalar_outputs(scope.graph, [low, high])
        if owner.op_type == "If":
            _neutral_outputs(_sibling_branch(owner, scope.attribute), fresh)
            low, high = fresh(f"{low}_out"), fresh(f"{high}_out")
            owner.output.extend([low, high])
        else:  # Loop, Scan: one value per iteration comes out stacked; reduce it again outside
            _extend_scan_attributes(owner)
            stacked_low, stacked_high = fresh(f"{low}_per_iteration"), fresh(f"{high}_per_iteration")
            owner.output.extend([stacked_low, stacked_high])
            low, high = fresh(f"{low}_out"), fresh(f"{high}_out")
            parent.graph.node.extend([
                helper.make_node("ReduceMin", [stacked_low], [low], keepdims=0, name=fresh(f"{low}_ReduceMin")),
                helper.make_node("ReduceMax", [stacked_high], [high], keepdims=0, name=fresh(f"{high}_ReduceMax")),
            ])
        scope = parent
    _add_scalar_outputs(scope.graph, [low, high])
    return low, high


def _add_scalar_outputs(graph: onnx.GraphProto, names: list[str]) -> None:
    graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, []) for name in names)


def _sibling_branch(node: onnx.NodeProto, attribute: str) -> onnx.GraphProto:
    other = "else_branch" if attribute == "then_branch" else "then_branch"
    return next(a.g for a in node.attribute if a.name == other)


def _neutral_outputs(branch: onnx.GraphProto, fresh: Callable[[str], str]) -> None:
    """+inf and -inf as the branch's next two outputs: neutral for min and max."""
    names = []
    for value, label in ((np.inf, "plus_inf"), (-np.inf, "minus_inf")):
        name = fresh(f"probe_{label}")
        branch.node.append(helper.make_node("Constant", [], [name], name=fresh(f"{name}_Constant"),
                                            value=helper.make_tensor(name, TensorProto.FLOAT, [], [value])))
        names.append(name)
    _add_scalar_outputs(branch, names)


def _extend_scan_attributes(node: onnx.NodeProto) -> None:
    """A Scan with explicit per-output axes/directions needs one entry per new scan output."""
    if node.op_type != "Scan":
        return
    for attribute in node.attribute:
        if attribute.name in ("scan_output_axes", "scan_output_directions"):
            attribute.ints.extend([0, 0])

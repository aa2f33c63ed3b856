"""Normalize at import: odd-but-legal exporter habits handled once, when a model is loaded.

Three habits of real exporters make every later pass special-case them; `normalize` removes them:
  * weights held in `Constant` nodes (paddle2onnx, some TensorFlow and scripted exports) become
    initializers of the same name (floating point, more than one element: scalar bounds, shapes and
    indices stay Constant nodes, they are not weights);
  * initializers also listed as graph inputs (`torch.onnx.export(keep_initializers_as_inputs=True)`, IR < 4
    exporters) are dropped from the inputs: they are weights. Feeding a replacement weight at run time is
    not supported by compressq, and the outputs it writes do not accept one;
  * unnamed nodes (and repeated names) get unique names, so `--exclude`, plans and reports can name them.
What was changed is recorded (`Normalized.changes`) and said once on stderr at load.

The result is held to the contract every pass keeps (graph/passes.py). Constant-held weights inside
subgraphs (If/Loop/Scan bodies) become initializers of their body; only the main graph's inputs are touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from compressq.graph.edit import name_nodes
from compressq.graph.index import all_nodes, scopes
from compressq.graph.passes import check_contract, checks_enabled, interface

logger = logging.getLogger("compressq")

# IR 3 requires every initializer to be listed as a graph input; from IR 4 on, an initializer may stand alone.
FIRST_IR_WITH_FREE_INITIALIZERS = 4
# A Constant holds a weight when it is one of these types with more than one element (as inspect counts).
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


# ---------------------------------------------------------------------------------------------------
# Normalizing


@dataclass
class Normalized:
    model: onnx.ModelProto
    constants_to_initializers: list[str] = field(default_factory=list)   # tensor names
    inputs_dropped: list[str] = field(default_factory=list)              # initializers no longer inputs
    nodes_named: int = 0
    ir_version_raised: tuple[int, int] | None = None

    @property
    def changed(self) -> bool:
        return bool(self.constants_to_initializers or self.inputs_dropped or self.nodes_named
                    or self.ir_version_raised)

    @property
    def changes(self) -> list[str]:
        """What was changed, one phrase each, in the user's words."""
        said = []
        if self.constants_to_initializers:
            said.append(f"{len(self.constants_to_initializers)} weights held in Constant nodes stored as initializers")
        if self.inputs_dropped:
            said.append(f"{len(self.inputs_dropped)} weights listed as graph inputs are no longer inputs "
                        "(feeding replacement weights is not supported)")
        if self.nodes_named:
            said.append(f"{self.nodes_named} unnamed or repeated node names made unique")
        if self.ir_version_raised:
            old, new = self.ir_version_raised
            said.append(f"IR version {old} -> {new} (initializers need not be inputs from IR 4 on)")
        return said


def normalize(model: onnx.ModelProto, *, in_place: bool = False, check: bool = True) -> Normalized:
    """Constant-held weights -> initializers, initializers out of the graph inputs, unique node names.

    A model that needs none of it is returned as it is (the same object, not a copy). Otherwise a copy is
    changed, or `model` itself with `in_place=True` (load_model: the proto is its own). With `check`, the
    result is proved to keep the interface and to pass onnx.checker.
    """
    if not _needs_work(model):
        return Normalized(model)
    before = interface(model)
    if not in_place:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    result = Normalized(model)
    graph = model.graph
    # Bodies first: moving a graph's nodes copies them, bodies included, so a parent goes after its children.
    result.constants_to_initializers = [name for scope in reversed(scopes(graph))
                                        for name in _constants_to_initializers(scope.graph)]
    weights = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    kept_inputs = [v for v in graph.input if v.name not in weights]
    result.inputs_dropped = [v.name for v in graph.input if v.name in weights]
    if result.inputs_dropped:
        del graph.input[:]
        graph.input.extend(kept_inputs)
    moved_weights = result.constants_to_initializers or result.inputs_dropped
    if moved_weights and model.ir_version < FIRST_IR_WITH_FREE_INITIALIZERS:
        result.ir_version_raised = (model.ir_version, FIRST_IR_WITH_FREE_INITIALIZERS)
        model.ir_version = FIRST_IR_WITH_FREE_INITIALIZERS
    result.nodes_named = name_nodes(graph)
    if check:
        check_contract(before, model, "normalizing the model at load")
    return result


def normalize_at_load(model: onnx.ModelProto, source: object = "the model") -> onnx.ModelProto:
    """The import step load_model runs: normalize the freshly parsed proto in place and say what changed."""
    result = normalize(model, in_place=True, check=checks_enabled())  # load_model has just checked the file
    if result.changed:
        logger.warning("note: %s normalized at load: %s", getattr(source, "name", source), "; ".join(result.changes))
    return result.model


def _needs_work(model: onnx.ModelProto) -> bool:
    graph = model.graph
    weights = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    if any(v.name in weights for v in graph.input):
        return True
    for scope in scopes(graph):
        outputs = {o.name for o in scope.graph.output}
        if any(_constant_tensor(node, "") is not None for node in scope.graph.node
               if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs):
            return True
    seen: set[str] = set()
    for node in all_nodes(graph):
        if not node.name or node.name in seen:
            return True
        seen.add(node.name)
    return False


def _constant_tensor(node: onnx.NodeProto, name: str) -> onnx.TensorProto | None:
    """The weight a Constant node holds, named `name`: floating point with more than one element, the rule
    `inspect` counts parameters by. Scalars (clip bounds, scales), integers (shapes, axes, indices),
    strings and sparse values are not weights: None, and the node stays."""
    if len(node.output) != 1 or not node.output[0] or len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    if attribute.name == "value":
        if attribute.t.data_type not in FLOAT_TYPES or int(np.prod(attribute.t.dims)) <= 1:
            return None
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attribute.t)
        tensor.name = name
        return tensor
    if attribute.name == "value_floats" and len(attribute.floats) > 1:
        return numpy_helper.from_array(np.array(attribute.floats, dtype=np.float32), name)
    return None


def _constants_to_initializers(graph: onnx.GraphProto) -> list[str]:
    outputs = {o.name for o in graph.output}
    existing = {t.name for t in graph.initializer}
    moved, kept = [], []
    for node in graph.node:
        tensor = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output and \
                node.output[0] not in outputs and node.output[0] not in existing:
            tensor = _constant_tensor(node, node.output[0])
        if tensor is None:
            kept.append(node)
            continue
        graph.initializer.append(tensor)
        moved.append(tensor.name)
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved

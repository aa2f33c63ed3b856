"""Which nodes and tensors get quantized, decided before any calibration runs (NNCF's "what" step).

The plan aims at graphs that onnxruntime's QDQ fusion turns into integer kernels, and nothing else:
  * compute nodes (Conv, Gemm, MatMul with a constant weight) get int8 weights and a quantized input;
  * a Relu/Clip(0, x) right after a quantized node is absorbed: the uint8 output range starting at zero
    already clamps negatives, so the activation node disappears;
  * data-movement ops (MaxPool, Reshape, Flatten, ...) between quantized nodes share the scale of their
    input, so onnxruntime drops the DequantizeLinear/QuantizeLinear pair around them and they run on int8;
  * Add, Concat and average pools between quantized nodes get their own output scale (QLinearAdd, ...);
  * everything else stays float, with a reason recorded for the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from compressq.graph.index import MAIN_GRAPH, GraphIndex, check_exclude, excluded_by, node_attributes, scopes
from compressq.graph.passes import Skip
from compressq.ops import INTEGER_WEIGHTED_OPS

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
ALREADY_INT8 = "already int8"  # how a skip reason starts when the node is quantized already (not float)
SHARED_SCALE_OPS = frozenset({
    "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Resize",
    "SpaceToDepth", "DepthToSpace",
})
# Ops with an integer kernel in onnxruntime (QLinearAdd, QLinearMul, QLinearConcat, QLinearSigmoid,
# QLinearLeakyRelu, QLinearGlobalAveragePool, QLinearAveragePool) that take their own output scale.
OWN_SCALE_OPS = frozenset({"Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu"})
ABSORBABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
# Element-wise Max/Min of several int8 tensors with one scale is exact on the integers (maxout: tf2onnx's
# Max of two convolutions). The group shares the output's range: max(a, b) >= low(out) always, so clipping
# an input below low(out) cannot change the result (Min: symmetric at the top).
SELECT_OPS = frozenset({"Max", "Min"})
# Split shares its input's scale on every output (onnxruntime then runs it on int8): a maxout's halves.
SPLIT_OPS = frozenset({"Split"})
# Weighted layers that onnxruntime has no integer kernel for: listed as kept float with the measured reason.
FLOAT_ONLY_WEIGHTED_OPS = {
    "ConvTranspose": "onnxruntime has no integer ConvTranspose kernel (CPU: a QDQ ConvTranspose stays a float "
                     "ConvTranspose between DequantizeLinear/QuantizeLinear, measured 0.82x fp32)",
}
CONSTANT_OPERAND_OPS = frozenset({"Add", "Mul"})  # QLinearAdd/QLinearMul take a quantized constant too
FLOAT_TYPES = (onnx.TensorProto.FLOAT,)


@dataclass(frozen=True)
class ComputeNode:
    name: str
    op_type: str
    activation: str           # the float input that gets QuantizeLinear/DequantizeLinear
    weight: str               # constant float weight -> int8 initializer + DequantizeLinear
    weight_axis: int | None   # output-channel axis for per-channel scales (None: per-tensor)
    bias: str | None          # constant bias -> int32 initializer + DequantizeLinear
    output: str               # the tensor the node writes
    depthwise: bool = False
    weight_size: int = 0
    reduction_size: int = 0   # inputs summed per output value: Cin/group x kh x kw, or K


@dataclass(frozen=True)
class Absorbed:
    """A Relu/Clip folded into the quantization of its producer's output."""

    node: str
    output: str


@dataclass
class QuantPlan:
    compute: dict[str, ComputeNode] = field(default_factory=dict)
    quantized_tensors: set[str] = field(default_factory=set)
    # tensor -> the tensor whose scale/zero point it shares (itself for group roots)
    param_source: dict[str, str] = field(default_factory=dict)
    # compute/own-scale node output -> absorbed activation node (its output is the quantized tensor)
    absorbed: dict[str, Absorbed] = field(default_factory=dict)
    own_scale_nodes: set[str] = field(default_factory=set)
    shared_scale_nodes: set[str] = field(default_factory=set)
    # tensors whose producer becomes an integer kernel: consumers read the dequantized value by its name
    produced_quantized: set[str] = field(default_factory=set)
    skipped: list[Skip] = field(default_factory=list)
    # With If/Loop/Scan bodies: one plan per graph (label -> plan), each rewritten in its own graph; the
    # fields above are then their union (node names are unique model-wide; see graph.normalize).
    parts: dict[str, QuantPlan] = field(default_factory=dict)

    def main_part(self) -> QuantPlan:
        """The plan of the main graph alone (statistics that only the main graph can expose)."""
        return self.parts.get(MAIN_GRAPH, self)

    def absorb(self, part: QuantPlan) -> None:
        self.compute.update(part.compute)
        self.quantized_tensors |= part.quantized_tensors
        self.param_source.update(part.param_source)
        self.absorbed.update(part.absorbed)
        self.own_scale_nodes |= part.own_scale_nodes
        self.shared_scale_nodes |= part.shared_scale_nodes
        self.produced_quantized |= part.produced_quantized
        self.skipped += part.skipped



def matches(node: onnx.NodeProto, patterns: tuple[str, ...]) -> bool:
    return excluded_by(node, patterns) is not None


def build_plan(
    model: onnx.ModelProto,
    *,
    exclude: tuple[str, ...] = (),
    keep_float: dict[str, str] | None = None,
    absorb_activations: bool = True,
    quantize_depthwise: bool = True,
) -> QuantPlan:
    """`keep_float` maps node names to the reason they must stay float (from earlier measurements).

    Nodes inside If/Loop/Scan bodies are planned graph by graph (a body sees the weights of the graphs
    around it); `plan.parts` keeps each graph's plan for the rewrite."""
    keep_float = keep_float or {}
    check_exclude(model.graph, exclude)
    found = scopes(model.graph)
    if len(found) == 1:
        return _graph_plan(model.graph, GraphIndex(model.graph), exclude, keep_float, absorb_activations,
                           quantize_depthwise)
    plan = QuantPlan()
    for scope in found:
        part = _graph_plan(scope.graph, scope.index(), exclude, keep_float, absorb_activations, quantize_depthwise)
        plan.parts[scope.label] = part
        plan.absorb(part)
    return plan


def _graph_plan(graph: onnx.GraphProto, index: GraphIndex, exclude, keep_float, absorb_activations: bool,
                quantize_depthwise: bool) -> QuantPlan:
    plan = QuantPlan()
    already_quantized = _nodes_touching_qdq(index)
    for node in graph.node:
        if node.op_type in INTEGER_WEIGHTED_OPS:  # quantized already: reported as such, left as it is
            bits = "4-bit weights, " if node.op_type == "MatMulNBits" and node_attributes(node).get("bits") == 4 else ""
            plan.skipped.append(Skip(node.name, node.op_type, f"{ALREADY_INT8} ({bits}{node.op_type} kept as is)"))
        if node.op_type in FLOAT_ONLY_WEIGHTED_OPS:
            plan.skipped.append(Skip(node.name, node.op_type, FLOAT_ONLY_WEIGHTED_OPS[node.op_type]))
        if node.op_type not in COMPUTE_OPS:
            continue
        reason = _why_float(node, index, exclude, keep_float, already_quantized, quantize_depthwise)
        if reason:
            plan.skipped.append(Skip(node.name, node.op_type, reason))
        else:
            plan.compute[node.name] = _compute_node(node, index)
    _plan_tensors(plan, graph, index, exclude, keep_float, already_quantized, absorb_activations)
    return plan


def _nodes_touching_qdq(index: GraphIndex) -> set[str]:
    """Nodes already inside a QDQ group (quantization-aware training, an earlier run): kept as they are."""
    touched = set()
    for node in index.graph.node:
        from_dq = any(index.producer.get(i) is not None and index.producer[i].op_type == "DequantizeLinear"
                      for i in node.input)
        to_q = any(c.op_type == "QuantizeLinear" for o in node.output for c in index.consumers.get(o, []))
        if from_dq or to_q or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            touched.add(node.name)
    return touched


def _why_float(node, index: GraphIndex, exclude, keep_float, already_quantized, quantize_depthwise) -> str | None:
    if node.name in keep_float:
        return keep_float[node.name]
    if matches(node, exclude):
        return "excluded by --exclude"
    if node.name in already_quantized:
        return ALREADY_INT8 + " (existing QuantizeLinear/DequantizeLinear kept as is)"
    if len(node.input) < 2 or not index.is_constant(node.input[1]):
        return "weight is not a constant (activation x activation products stay float)"
    weight = index.initializers.get(node.input[1])
    if weight is None or weight.data_type not in FLOAT_TYPES:
        return "weight is not a float32 initializer"
    attributes = node_attributes(node)
    if node.op_type == "MatMul" and len(weight.dims) != 2:
        return "batched MatMul weight (onnxruntime's integer MatMul needs a 2-D weight)"
    if node.op_type == "Gemm" and (attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0
                                   or attributes.get("beta", 1.0) != 1.0):
        return "Gemm with transA/alpha/beta has no integer kernel"
    if node.op_type == "Conv" and _is_depthwise(node, weight) and not quantize_depthwise:
        return "depthwise convolution kept float"
    return None


def _is_depthwise(node: onnx.NodeProto, weight: onnx.TensorProto) -> bool:
    group = node_attributes(node).get("group", 1)
    return group > 1 and weight.dims[1] == 1


def _weight_axis(node: onnx.NodeProto, weight: onnx.TensorProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node_attributes(node).get("transB", 0) else 1
    return 1  # MatMul weight [K, N]: one scale per output column


def _compute_node(node: onnx.NodeProto, index: GraphIndex) -> ComputeNode:
    weight = index.initializers[node.input[1]]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (bias not in index.initializers or len(index.initializers[bias].dims) != 1):
        bias = None if node.op_type == "Conv" else bias
    depthwise = node.op_type == "Conv" and _is_depthwise(node, weight)
    size = 1
    for dim in weight.dims:
        size *= dim
    axis = _weight_axis(node, weight)
    reduction = size // weight.dims[axis] if weight.dims[axis] else 0
    return ComputeNode(node.name, node.op_type, node.input[0], node.input[1], axis, bias, node.output[0],
                       depthwise, size, reduction)


def _absorbable(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip":
        return False
    low = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if low is None:
        low = node_attributes(node).get("min")
    return low is not None and float(low) == 0.0


def _plan_tensors(plan: QuantPlan, graph, index: GraphIndex, exclude, keep_float, already_quantized,
                  absorb_activations: bool) -> None:
    produced_int = _integer_producers(plan, graph, index, exclude, keep_float, already_quantized,
                                      absorb_activations)
    wanted = _wanted_tensors(plan, graph, index, produced_int)
    for compute in plan.compute.values():
        final = _final_tensor(plan, compute.output)
        if compute.op_type == "Conv" or final in wanted:
            plan.quantized_tensors.add(final)
            plan.produced_quantized.add(final)
        plan.quantized_tensors.add(compute.activation)
    for node in graph.node:
        if node.name in plan.own_scale_nodes and _final_tensor(plan, node.output[0]) in wanted:
            plan.quantized_tensors.update(i for i in node.input if not index.is_constant(i))
            plan.quantized_tensors.add(_final_tensor(plan, node.output[0]))
            plan.produced_quantized.add(_final_tensor(plan, node.output[0]))
        elif node.name in plan.own_scale_nodes:
            plan.own_scale_nodes.discard(node.name)
            plan.absorbed.pop(node.output[0], None)
    _drop_unused_absorptions(plan)
    _share_scales(plan, graph, index, wanted)


def _final_tensor(plan: QuantPlan, tensor: str) -> str:
    absorbed = plan.absorbed.get(tensor)
    return absorbed.output if absorbed is not None else tensor


def _drop_unused_absorptions(plan: QuantPlan) -> None:
    for tensor in list(plan.absorbed):
        if _final_tensor(plan, tensor) not in plan.quantized_tensors:
            plan.absorbed.pop(tensor)


def _integer_producers(plan, graph, index: GraphIndex, exclude, keep_float, already_quantized,
                       absorb_activations: bool) -> set[str]:
    """Tensors that can exist as int8 after fusion (forward pass in graph order)."""
    produced: set[str] = set()
    for node in graph.node:
        if node.name in plan.compute or (
                node.op_type in OWN_SCALE_OPS and _all_inputs_int(node, index, produced)
                and not matches(node, exclude) and node.name not in keep_float
                and node.name not in already_quantized):
            if node.name not in plan.compute:
                plan.own_scale_nodes.add(node.name)
            produced.add(_absorb_activation(plan, node, index, absorb_activations))
        elif _moves_integers(node, index, produced) and not matches(node, exclude):
            produced.update(node.output if node.op_type in SPLIT_OPS else node.output[:1])
    return produced


def _moves_integers(node, index: GraphIndex, produced: set[str]) -> bool:
    if node.op_type in SHARED_SCALE_OPS | SPLIT_OPS:
        return bool(node.input) and node.input[0] in produced
    return node.op_type in SELECT_OPS and _selects_integers(node, index, produced)


def _selects_integers(node, index: GraphIndex, produced: set[str]) -> bool:
    """A Max/Min of two or more tensors that all exist as int8, each read by this node alone (the group
    takes the output's range, which only this node may see clipped)."""
    data = [i for i in node.input if i]
    return len(data) > 1 and len(set(data)) == len(data) and all(
        i in produced and not index.is_constant(i) and _read_once(i, index) for i in data)


def _read_once(tensor: str, index: GraphIndex) -> bool:
    return len(index.consumers.get(tensor, [])) == 1 and tensor not in index.graph_outputs


def _all_inputs_int(node, index: GraphIndex, produced: set[str]) -> bool:
    """Every data input exists as int8; Add/Mul may also take one float constant (quantized on its own)."""
    inputs = [i for i in node.input if i]
    constants = [i for i in inputs if index.is_constant(i)]
    data = [i for i in inputs if i not in constants]
    if constants and (node.op_type not in CONSTANT_OPERAND_OPS or len(constants) > 1
                      or not _float_constant(index, constants[0])):
        return False
    return bool(data) and all(i in produced for i in data)


def _float_constant(index: GraphIndex, name: str) -> bool:
    """A finite float scalar (or a tensor of one repeated value): 8 bits represent it exactly, whereas a
    per-channel vector (a decomposed LayerNorm's gamma) would lose precision in a single scale."""
    value = index.constant(name)
    return (value is not None and value.dtype == np.float32 and value.size > 0
            and bool(np.isfinite(value).all()) and bool(np.all(value == value.flat[0])))


def _absorb_activation(plan: QuantPlan, node, index: GraphIndex, absorb_activations: bool) -> str:
    output = node.output[0]
    follower = index.single_consumer(output)
    if absorb_activations and follower is not None and _absorbable(follower, index):
        plan.absorbed[output] = Absorbed(follower.name, follower.output[0])
        return follower.output[0]
    return output


def _wanted_tensors(plan, graph, index: GraphIndex, produced_int: set[str]) -> set[str]:
    """Tensors some integer kernel wants as int8 input (backward pass in reverse graph order)."""
    wanted = {c.activation for c in plan.compute.values()}
    for node in reversed(list(graph.node)):
        outputs_wanted = _final_tensor(plan, node.output[0]) in wanted if node.output else False
        if node.name in plan.own_scale_nodes and outputs_wanted:
            wanted.update(i for i in node.input if not index.is_constant(i))
        elif node.op_type in SHARED_SCALE_OPS and outputs_wanted and node.input[0] in produced_int:
            wanted.add(node.input[0])
        elif node.op_type in SELECT_OPS and outputs_wanted and node.output[0] in produced_int:
            wanted.update(node.input)
        elif node.op_type in SPLIT_OPS and set(node.output) & wanted and node.input[0] in produced_int:
            wanted.add(node.input[0])
    return wanted


def _share_scales(plan: QuantPlan, graph, index: GraphIndex, wanted: set[str]) -> None:
    for tensor in plan.quantized_tensors:
        plan.param_source[tensor] = tensor
    for node in graph.node:  # graph order: a chain's source is resolved before its followers
        if node.op_type not in SHARED_SCALE_OPS | SPLIT_OPS or not node.input:
            continue
        source = node.input[0]
        for output in node.output if node.op_type in SPLIT_OPS else node.output[:1]:
            if source in plan.produced_quantized and output in wanted:
                plan.quantized_tensors.add(output)
                plan.produced_quantized.add(output)
                plan.param_source[output] = plan.param_source.get(source, source)
                plan.shared_scale_nodes.add(node.name)
    for node in graph.node:
        if node.op_type in SELECT_OPS:
            _share_select_scale(plan, node, index, wanted)


def _share_select_scale(plan: QuantPlan, node, index: GraphIndex, wanted: set[str]) -> None:
    """Max/Min inputs and output in one group rooted at the output (see SELECT_OPS); chains that feed an
    input through data-movement ops (Transpose, Reshape) move to the output's range with it, unless some
    tensor of such a chain is read elsewhere too (then the Max stays float between its own pairs)."""
    output = node.output[0]
    if output not in wanted or not all(i in plan.produced_quantized for i in node.input):
        return
    roots = {plan.param_source.get(i, i) for i in node.input}
    group = [tensor for tensor, root in plan.param_source.items() if root in roots]
    if not all(_read_once(tensor, index) for tensor in group):
        return
    plan.quantized_tensors.add(output)
    plan.produced_quantized.add(output)
    for tensor in group:
        plan.param_source[tensor] = output
    plan.param_source[output] = output
    plan.shared_scale_nodes.add(node.name)
